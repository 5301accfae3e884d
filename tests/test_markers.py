"""The requires_* markers and the gpu / gpus fixtures (src/pytest_unsloth/markers.py)."""

from __future__ import annotations

import contextlib
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distfake import write_dist
from gpuspecs import fake_gpu
from pytest_unsloth import markers
from pytest_unsloth.util.units import GIB

# Hypothesis's pytest plugin imports hypothesis in every inline pytester run's terminal summary
# (about 1.5 s), and pytester drops modules first imported during a run: import it once here so
# each inline run reuses it.
with contextlib.suppress(ImportError):
    import hypothesis  # noqa: F401

GPU_MACHINE = os.environ.get("UNSLOTH_TEST_GPU") == "1"

L4 = fake_gpu("L4", uuid="GPU-4c4c4c4c-0000-1111-2222-333333333333", free_gib=14.7)
T4 = fake_gpu("T4", uuid="GPU-74747474-0000-1111-2222-333333333333", free_gib=14.5)
BUSY_H100 = fake_gpu(
    "H100",
    uuid="GPU-h100h100-0000-1111-2222-333333333333",
    free_gib=2.25,
    processes=[{"pid": 4242, "used_gib": 77.0}],
)
A100_MIG = fake_gpu(
    "A100",
    uuid="GPU-a100a100-0000-1111-2222-333333333333",
    free_gib=79.0,
    mig=[
        {
            "uuid": "MIG-aaaa0000-0000-1111-2222-333333333333",
            "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
            "total_gib": 39.5,
            "free_gib": 30.0,
        },
        {
            "uuid": "MIG-bbbb0000-0000-1111-2222-333333333333",
            "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
            "total_gib": 39.5,
            "free_gib": 39.0,
        },
    ],
)
NO_DRIVER = "needs an NVIDIA GPU, but NVML is unavailable: NVML Shared Library Not Found"


def outcomes(pytester: pytest.Pytester, source: str, *args: str) -> dict[str, tuple[str, str]]:
    """Run ``source`` inline; map each test's name to (outcome, skip reason or error text)."""
    pytester.makepyfile(test_m=textwrap.dedent(source))
    reprec = pytester.inline_run("-p", "no:cacheprovider", *args)
    out: dict[str, tuple[str, str]] = {}
    for rep in reprec.getreports("pytest_runtest_logreport"):
        name = rep.nodeid.split("::", 1)[-1]
        if rep.when == "call" or rep.outcome != "passed":
            if rep.skipped and isinstance(rep.longrepr, tuple):
                text = rep.longrepr[2].removeprefix("Skipped: ")
            else:
                text = rep.longreprtext
            out.setdefault(name, (rep.outcome, text))
    return out


def reason(result: dict[str, tuple[str, str]], name: str) -> str:
    outcome, text = result[name]
    assert outcome == "skipped", (outcome, text)
    return text


# ----------------------------------------------------------------------------------------------
# Registration


def test_markers_registered_with_signature_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.requires_vram(amount, *, free=True, device=None, total_across=False): *"
            "1 GB = 10**9 bytes*",
            "@pytest.mark.requires_kernel(*names): *",
            "@pytest.mark.requires_gpu(count=1, *, capability=None): *",
            "@pytest.mark.requires_bf16: *",
        ]
    )
    # --strict-markers accepts them
    pytester.makepyfile(
        "import pytest\n@pytest.mark.requires_bf16\n@pytest.mark.requires_vram(1)\n"
        "def test_a(): pass\n"
    )
    assert pytester.runpytest("--strict-markers", "--co").ret == 0


def test_signature_text_has_no_annotations() -> None:
    assert (
        markers._signature_text("requires_vram")
        == "requires_vram(amount, *, free=True, device=None, total_across=False)"
    )
    assert markers._signature_text("requires_gpu") == "requires_gpu(count=1, *, capability=None)"


# ----------------------------------------------------------------------------------------------
# requires_vram


VRAM_TESTS = """
    import pytest

    @pytest.mark.requires_vram(24)
    def test_24(): pass

    @pytest.mark.requires_vram(14)
    def test_14(): pass

    @pytest.mark.requires_vram("16GB")
    def test_16gb(): pass

    @pytest.mark.requires_vram("14GB")
    def test_14gb(): pass

    @pytest.mark.requires_vram("16 GiB")
    def test_16gib(): pass

    @pytest.mark.requires_vram("16000MiB")
    def test_16000mib(): pass

    @pytest.mark.requires_vram(14.72)
    def test_just_over(): pass

    @pytest.mark.requires_vram(14.69)
    def test_just_under(): pass

    @pytest.mark.requires_vram(20, free=False)
    def test_capacity_ok(): pass

    @pytest.mark.requires_vram("24GiB", free=False)
    def test_capacity_short(): pass

    @pytest.mark.requires_vram(14.6, device=1)
    def test_dev1_short(): pass

    @pytest.mark.requires_vram(14, device="cuda:1")
    def test_dev1_ok(): pass

    @pytest.mark.requires_vram(1, device=2)
    def test_dev2_missing(): pass

    @pytest.mark.requires_vram(29, total_across=True)
    def test_across_ok(): pass

    @pytest.mark.requires_vram(30, total_across=True)
    def test_across_short(): pass

    @pytest.mark.requires_vram(36, free=False, total_across=True)
    def test_across_capacity(): pass

    @pytest.mark.requires_vram(0)
    def test_zero(): pass
"""


def test_requires_vram_two_gpus(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[L4, T4])
    r = outcomes(pytester, VRAM_TESTS)
    assert reason(r, "test_24") == (
        "needs 24.0 GiB free on cuda:0 (NVIDIA L4), has 14.7 GiB free of 22.5 GiB"
    )
    assert r["test_14"][0] == "passed"
    assert reason(r, "test_16gb") == (
        "needs 14.9 GiB (16GB) free on cuda:0 (NVIDIA L4), has 14.7 GiB free of 22.5 GiB"
    )
    assert r["test_14gb"][0] == "passed"  # 14 GB = 13.04 GiB
    assert reason(r, "test_16gib").startswith("needs 16.0 GiB (16 GiB) free on cuda:0")
    assert reason(r, "test_16000mib").startswith("needs 15.6 GiB (16000MiB) free on cuda:0")
    # One decimal would print "needs 14.7, has 14.7": more decimals until they differ.
    assert reason(r, "test_just_over") == (
        "needs 14.72 GiB free on cuda:0 (NVIDIA L4), has 14.70 GiB free of 22.5 GiB"
    )
    assert r["test_just_under"][0] == "passed"
    assert r["test_capacity_ok"][0] == "passed"
    assert reason(r, "test_capacity_short") == (
        "needs 24.0 GiB (24GiB) total on cuda:0 (NVIDIA L4), has 22.5 GiB"
    )
    assert reason(r, "test_dev1_short") == (
        "needs 14.6 GiB free on cuda:1 (Tesla T4), has 14.5 GiB free of 15.0 GiB"
    )
    assert r["test_dev1_ok"][0] == "passed"
    assert reason(r, "test_dev2_missing") == (
        "needs 1.0 GiB free on cuda:2, but only 2 GPU(s) are visible"
    )
    assert r["test_across_ok"][0] == "passed"
    assert reason(r, "test_across_short") == (
        "needs 30.0 GiB free across 2 visible GPU(s), has 29.2 GiB free of 37.5 GiB "
        "(cuda:0 (NVIDIA L4): 14.7 GiB, cuda:1 (Tesla T4): 14.5 GiB)"
    )
    assert r["test_across_capacity"][0] == "passed"  # 37.5 GiB in total
    assert r["test_zero"][0] == "passed"


def test_requires_vram_busy_gpu(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[BUSY_H100])
    r = outcomes(
        pytester,
        """
        import pytest

        @pytest.mark.requires_vram(8)
        def test_needs_8(): pass

        @pytest.mark.requires_vram(8, free=False)
        def test_capacity(): pass
        """,
    )
    assert reason(r, "test_needs_8") == (
        "needs 8.0 GiB free on cuda:0 (NVIDIA H100 80GB HBM3), has 2.2 GiB free of 79.6 GiB"
    )
    assert r["test_capacity"][0] == "passed"  # why total-memory gates still OOM


@pytest.mark.parametrize(
    ("cvd", "expected"),
    [
        ("", "needs an NVIDIA GPU, but CUDA_VISIBLE_DEVICES='' hides all 2 GPU(s)"),
        ("-1", "needs an NVIDIA GPU, but CUDA_VISIBLE_DEVICES='-1' hides all 2 GPU(s)"),
        ("1", "needs 15.0 GiB free on cuda:0 (Tesla T4), has 14.5 GiB free of 15.0 GiB"),
        ("GPU-7474", "needs 15.0 GiB free on cuda:0 (Tesla T4), has 14.5 GiB free of 15.0 GiB"),
        ("1,0", "needs 15.0 GiB free on cuda:0 (Tesla T4), has 14.5 GiB free of 15.0 GiB"),
        ("0", "needs 15.0 GiB free on cuda:0 (NVIDIA L4), has 14.7 GiB free of 22.5 GiB"),
        ("7", "needs an NVIDIA GPU, but CUDA_VISIBLE_DEVICES='7' hides all 2 GPU(s)"),
    ],
)
def test_requires_vram_follows_cuda_visible_devices(
    pytester: pytest.Pytester,
    fake_nvml: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    cvd: str,
    expected: str,
) -> None:
    fake_nvml(gpus=[L4, T4])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    r = outcomes(
        pytester,
        """
        import pytest

        @pytest.mark.requires_vram(15)
        def test_15(): pass
        """,
    )
    assert reason(r, "test_15") == expected


def test_requires_vram_on_mig(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpus=[A100_MIG])
    source = """
        import pytest

        @pytest.mark.requires_vram(35)
        def test_35(): pass

        @pytest.mark.requires_bf16
        def test_bf16(): pass
    """
    r = outcomes(pytester, source)
    assert reason(r, "test_35") == (
        "needs 35.0 GiB free on cuda:0 (NVIDIA A100-SXM4-80GB MIG 3g.40gb), has 30.0 GiB free "
        "of 39.5 GiB"
    )
    assert r["test_bf16"][0] == "passed"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-bbbb")
    r = outcomes(pytester, source)
    assert r["test_35"][0] == "passed"


def test_free_memory_is_read_at_evaluation_time(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], tmp_path: Any
) -> None:
    handle = fake_nvml(gpus=[L4])
    busy = dict(handle.spec, gpus=[dict(L4, free_gib=1.0)])
    busy_path = tmp_path / "busy.json"
    busy_path.write_text(__import__("json").dumps(busy))
    loaded = dict(handle.spec, gpus=[dict(L4, free_gib=0.5)])
    loaded_path = tmp_path / "loaded.json"
    loaded_path.write_text(__import__("json").dumps(loaded))
    r = outcomes(
        pytester,
        f"""
        import os
        import pytest

        @pytest.mark.requires_vram(10)
        def test_1_before(): pass

        def test_2_someone_takes_memory():
            os.environ["PYTEST_UNSLOTH_FAKE_NVML"] = {str(busy_path)!r}

        @pytest.mark.requires_vram(10)
        def test_3_after(): pass

        def test_4_gpu_fixture(gpu):
            assert gpu.free_bytes == {GIB}

        @pytest.fixture
        def model():  # a fixture set up before `gpu` takes memory
            os.environ["PYTEST_UNSLOTH_FAKE_NVML"] = {str(loaded_path)!r}

        @pytest.mark.requires_vram(0.75)
        def test_5_fixture_reads_after_earlier_fixtures(model, gpu):
            assert gpu.free_bytes == {GIB // 2}
        """,
    )
    assert r["test_5_fixture_reads_after_earlier_fixtures"][0] == "passed"
    assert r["test_1_before"][0] == "passed"
    assert reason(r, "test_3_after") == (
        "needs 10.0 GiB free on cuda:0 (NVIDIA L4), has 1.0 GiB free of 22.5 GiB"
    )
    assert r["test_4_gpu_fixture"][0] == "passed"


def test_nvml_reads_are_batched(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    handle = fake_nvml(gpus=[L4, T4])
    r = outcomes(
        pytester,
        """
        import pytest

        @pytest.mark.parametrize("i", range(40))
        @pytest.mark.requires_vram(1)
        @pytest.mark.requires_vram(2, device=1)
        @pytest.mark.requires_gpu(2)
        @pytest.mark.requires_bf16
        def test_many(i): pass

        @pytest.mark.parametrize("i", range(20))
        @pytest.mark.requires_vram(1, free=False)
        def test_static(i): pass

        @pytest.mark.parametrize("i", range(20))
        def test_unmarked(i): pass
        """,
    )
    assert [o for o, _ in r.values()] == ["passed"] * 80
    assert handle.calls["nvmlInit"] == 1  # once per session, not per test
    assert handle.calls["nvmlShutdown"] == 1  # closed at unconfigure
    assert handle.calls["nvmlDeviceGetCount"] == 1
    # Enumeration reads both GPUs once; each of the 40 evaluations re-reads both (one call per
    # device for the two requires_vram), the capacity-only and unmarked tests read nothing.
    assert handle.calls["nvmlDeviceGetMemoryInfo"] == 2 + 40 * 2


def test_unmarked_run_never_touches_nvml(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    handle = fake_nvml(gpus=[L4])
    r = outcomes(pytester, "def test_a(): pass\ndef test_b(): pass\n")
    assert [o for o, _ in r.values()] == ["passed", "passed"]
    assert handle.calls == {}


def test_not_evaluated_at_collection(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    handle = fake_nvml(gpus=[L4])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_vram(100)
        @pytest.mark.requires_kernel("bitsandbytes")
        def test_a(): pass

        @pytest.mark.requires_vram(-1)
        def test_bad(): pass
        """
    )
    result = pytester.runpytest("--co", "-q")
    assert result.ret == 0
    assert handle.calls == {}


def test_no_driver(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(no_driver=True)
    r = outcomes(
        pytester,
        """
        import pytest

        @pytest.mark.requires_vram(1)
        def test_vram(): pass

        @pytest.mark.requires_gpu
        def test_gpu(): pass

        @pytest.mark.requires_bf16()
        def test_bf16(): pass

        def test_fixture(gpu): pass

        def test_fixtures(gpus): pass
        """,
    )
    for name in ("test_vram", "test_gpu", "test_bf16"):
        assert reason(r, name) == NO_DRIVER + " (no NVIDIA driver here)"
    # Skips point at the test (as skipif's do), not at the plugin's module.
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["SKIPPED ?1? test_m.py:12: no usable GPU: *"])
    assert "markers.py" not in result.stdout.str()
    assert reason(r, "test_fixture") == (
        "no usable GPU: NVML is unavailable: NVML Shared Library Not Found (no NVIDIA driver here)"
    )
    assert reason(r, "test_fixtures").startswith("no usable GPU: NVML is unavailable")


def test_driver_without_gpus(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[])
    r = outcomes(pytester, "import pytest\n@pytest.mark.requires_gpu\ndef test_a(): pass\n")
    assert reason(r, "test_a") == "needs an NVIDIA GPU, but NVML reports no GPU"


def test_gpu_lost_between_tests(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    handle = fake_nvml(gpus=[L4])
    lost = dict(handle.spec, gpus=[dict(L4, errors={"nvmlDeviceGetMemoryInfo": "GpuIsLost"})])
    lost_path = pytester.path / "lost.json"
    lost_path.write_text(__import__("json").dumps(lost))
    r = outcomes(
        pytester,
        f"""
        import os
        import pytest

        @pytest.mark.requires_vram(1)
        def test_1(): os.environ["PYTEST_UNSLOTH_FAKE_NVML"] = {str(lost_path)!r}

        @pytest.mark.requires_vram(1)
        def test_2(): pass
        """,
    )
    assert r["test_1"][0] == "passed"
    assert reason(r, "test_2") == "needs an NVIDIA GPU, but NVML is unavailable: GPU is lost"


# ----------------------------------------------------------------------------------------------
# requires_gpu / requires_bf16


def test_requires_gpu_and_bf16(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[T4, L4])
    r = outcomes(
        pytester,
        """
        import pytest

        @pytest.mark.requires_gpu
        def test_one(): pass

        @pytest.mark.requires_gpu(2)
        def test_two(): pass

        @pytest.mark.requires_gpu(3)
        def test_three(): pass

        @pytest.mark.requires_gpu(capability=(8, 0))
        def test_ampere(): pass

        @pytest.mark.requires_gpu(2, capability="8.0")
        def test_two_ampere(): pass

        @pytest.mark.requires_gpu(capability=[9, 0])
        def test_hopper(): pass

        @pytest.mark.requires_gpu(capability=7)
        def test_volta(): pass

        @pytest.mark.requires_bf16
        def test_bf16(): pass
        """,
    )
    assert r["test_one"][0] == r["test_two"][0] == "passed"
    assert reason(r, "test_three") == (
        "needs 3 GPUs, has 2 (cuda:0 (Tesla T4): 7.5, cuda:1 (NVIDIA L4): 8.9)"
    )
    assert r["test_ampere"][0] == "passed"
    assert reason(r, "test_two_ampere") == (
        "needs 2 GPUs with compute capability >= 8.0, has 1 "
        "(cuda:0 (Tesla T4): 7.5, cuda:1 (NVIDIA L4): 8.9)"
    )
    assert reason(r, "test_hopper") == (
        "needs 1 GPU with compute capability >= 9.0, has 0 "
        "(cuda:0 (Tesla T4): 7.5, cuda:1 (NVIDIA L4): 8.9)"
    )
    assert r["test_volta"][0] == "passed"
    assert reason(r, "test_bf16") == (
        "needs bfloat16 (compute capability 8.0 or newer) on cuda:0 (Tesla T4), which is 7.5"
    )


def test_markers_on_class_and_module_stack(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[L4])
    r = outcomes(
        pytester,
        """
        import pytest

        pytestmark = pytest.mark.requires_gpu

        @pytest.mark.requires_vram(20)
        class TestBig:
            def test_a(self): pass

            @pytest.mark.requires_vram(10)
            def test_b(self): pass

        class TestSmall:
            @pytest.mark.requires_vram(10)
            def test_c(self): pass

            @pytest.mark.parametrize("n", [pytest.param(1), pytest.param(
                2, marks=pytest.mark.requires_gpu(2))])
            def test_d(self, n): pass
        """,
    )
    assert reason(r, "TestBig::test_a").startswith("needs 20.0 GiB free on cuda:0")
    assert reason(r, "TestBig::test_b").startswith("needs 20.0 GiB free on cuda:0")
    assert r["TestSmall::test_c"][0] == "passed"
    assert r["TestSmall::test_d[1]"][0] == "passed"
    assert reason(r, "TestSmall::test_d[2]").startswith("needs 2 GPUs, has 1")


# ----------------------------------------------------------------------------------------------
# Misuse


@pytest.mark.parametrize(
    ("marker", "problem"),
    [
        ("requires_vram(-3)", "amount -3 is not a non-negative, finite number of GiB"),
        ("requires_vram(float('nan'))", "amount nan is not a non-negative"),
        ("requires_vram('lots')", "amount 'lots' is not an amount of memory"),
        ("requires_vram('16 parsecs')", "amount '16 parsecs' is not an amount of memory"),
        ("requires_vram(True)", "amount True is not an amount of memory"),
        ("requires_vram(None)", "amount None is not an amount of memory"),
        ("requires_vram()", "missing a required argument: 'amount'"),
        ("requires_vram(8, fre=True)", "got an unexpected keyword argument 'fre'"),
        ("requires_vram(8, True)", "too many positional arguments"),
        ("requires_vram(8, free='yes')", "free='yes' is not True or False"),
        ("requires_vram(8, device=-1)", "device=-1 is not a CUDA device index"),
        ("requires_vram(8, device='gpu0')", "device='gpu0' is not a CUDA device index"),
        ("requires_vram(8, device=0, total_across=True)", "exclude each other"),
        ("requires_kernel()", "no kernel named"),
        ("requires_kernel('bitsandbites')", "unknown kernel 'bitsandbites'; did you mean"),
        ("requires_kernel(['triton'])", "['triton'] is not a kernel name"),
        ("requires_kernel(names='triton')", "got an unexpected keyword argument 'names'"),
        ("requires_gpu(0)", "count=0 is not a positive integer"),
        ("requires_gpu('2')", "count='2' is not a positive integer"),
        ("requires_gpu(capability='ampere')", "capability='ampere' is not a compute capability"),
        ("requires_gpu(capability=(8, 0, 1))", "is not a compute capability"),
        ("requires_gpu(capability=8.6)", "capability=8.6 is not a compute capability"),
        ("requires_bf16(True)", "too many positional arguments"),
    ],
)
def test_misuse_errors_that_test_only(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], marker: str, problem: str
) -> None:
    fake_nvml(no_driver=True)  # misuse must surface even where everything would skip
    r = outcomes(
        pytester,
        f"""
        import pytest

        @pytest.mark.{marker}
        def test_bad(): pass

        def test_fine(): pass
        """,
    )
    outcome, text = r["test_bad"]
    assert outcome == "failed"  # an error in setup
    assert text.startswith("test_m.py::test_bad: bad marker @pytest.mark.")
    assert problem in text
    name = marker.split("(")[0]
    assert f"Fix: write it as {markers._signature_text(name)}" in text
    assert "Traceback" not in text
    assert "INTERNALERROR" not in text
    assert r["test_fine"][0] == "passed"


def test_misuse_is_an_error_not_a_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "import pytest\n@pytest.mark.requires_vram('x')\ndef test_a(): pass\ndef test_b(): pass\n"
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1, passed=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_a*", "*bad marker*'x'*Fix:*"])
    result.stdout.no_fnmatch_line("*INTERNALERROR*")


# ----------------------------------------------------------------------------------------------
# Strict skips


@pytest.mark.parametrize("how", ["cli", "ini"])
def test_strict_skips_fail(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], how: str
) -> None:
    fake_nvml(gpus=[L4])
    args: list[str] = []
    if how == "cli":
        args.append("--unsloth-strict-skips")
    else:
        pytester.makeini("[pytest]\nunsloth_strict_skips = true\n")
    r = outcomes(
        pytester,
        """
        import pytest

        @pytest.mark.requires_vram(24)
        def test_big(): pass

        @pytest.mark.requires_vram(4)
        def test_small(): pass

        def test_fixture(gpus): pass
        """,
        *args,
    )
    outcome, text = r["test_big"]
    assert outcome == "failed"
    assert text == (
        "needs 24.0 GiB free on cuda:0 (NVIDIA L4), has 14.7 GiB free of 22.5 GiB "
        "[--unsloth-strict-skips: a missing resource fails]"
    )
    assert r["test_small"][0] == "passed"
    assert r["test_fixture"][0] == "passed"


def test_strict_skips_gpu_fixture_without_gpu(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(no_driver=True)
    r = outcomes(pytester, "def test_a(gpu): pass\n", "--unsloth-strict-skips")
    assert r["test_a"][0] == "failed"
    assert "no usable GPU" in r["test_a"][1]


# ----------------------------------------------------------------------------------------------
# requires_kernel


FAKE_STORE_CONFTEST = """
    import pytest
    from pytest_unsloth.probes.runner import PROBE_STORE_KEY
    from pytest_unsloth.probes.protocol import ProbeResult

    class FakeStore:
        def __init__(self):
            self.started = []
            self.got = []
            self.results = {
                "bitsandbytes": ProbeResult("bitsandbytes", "passed", "4-bit round trip ok"),
                "triton": ProbeResult("triton", "failed",
                                      "triton kernel failed: ptxas fatal: sm_120 not defined"),
                "unsloth": ProbeResult("unsloth", "skipped", "unsloth is not installed"),
            }

        def start(self, names):
            self.started.append(tuple(names))

        def get(self, name):
            self.got.append(name)
            return self.results[name]

    STORE = FakeStore()

    def pytest_configure(config):
        config.stash[PROBE_STORE_KEY] = STORE

    def pytest_unconfigure(config):
        with open("store.log", "w") as fh:
            fh.write(repr((STORE.started, STORE.got)))
"""


def test_requires_kernel_uses_probe_results(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[L4])
    pytester.makeconftest(textwrap.dedent(FAKE_STORE_CONFTEST))
    r = outcomes(
        pytester,
        """
        import pytest

        @pytest.mark.requires_kernel("bitsandbytes")
        def test_bnb(): pass

        @pytest.mark.requires_kernel("Bitsandbytes", "triton")
        def test_bnb_triton(): pass

        @pytest.mark.requires_kernel("unsloth")
        def test_unsloth(): pass

        @pytest.mark.requires_vram(100)
        @pytest.mark.requires_kernel("bitsandbytes")
        def test_vram_first(): pass
        """,
    )
    assert r["test_bnb"][0] == "passed"
    assert reason(r, "test_bnb_triton") == (
        "needs a working triton; its probe failed: triton kernel failed: ptxas fatal: sm_120 "
        "not defined"
    )
    assert reason(r, "test_unsloth") == (
        "needs a working unsloth; its probe did not run: unsloth is not installed"
    )
    assert reason(r, "test_vram_first").startswith("needs 100.0 GiB free")
    started, got = eval((pytester.path / "store.log").read_text())
    assert started == [("bitsandbytes",), ("bitsandbytes", "triton"), ("unsloth",)]
    assert got == ["bitsandbytes", "bitsandbytes", "triton", "unsloth"]


def test_requires_kernel_with_the_real_probe_store(
    pytester: pytest.Pytester,
    fake_nvml: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Real ProbeStore: not installed / no GPU are decided without starting a subprocess.
    fake_nvml(no_driver=True)
    # bitsandbytes must look installed (its metadata is all the store reads), so the no-GPU
    # branch is reached in the pytest-only env too.
    site = tmp_path / "site"
    write_dist(site, "bitsandbytes", "0.50.2")
    monkeypatch.syspath_prepend(str(site))
    r = outcomes(
        pytester,
        """
        import pytest

        @pytest.mark.requires_kernel("bitsandbytes")
        def test_bnb(): pass

        @pytest.mark.requires_kernel("flash_attn")
        def test_fa(): pass
        """,
    )
    assert reason(r, "test_bnb") == (
        "needs a working bitsandbytes; its probe did not run: no NVIDIA GPU: NVML says NVML "
        "Shared Library Not Found"
    )
    assert reason(r, "test_fa") == (
        "needs a working flash-attn; its probe did not run: flash-attn is not installed"
    )


# ----------------------------------------------------------------------------------------------
# gpu / gpus fixtures


def test_gpu_fixture_fields(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpus=[T4, L4], driver="580.159.04", cuda_driver=13000)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    r = outcomes(
        pytester,
        f"""
        import dataclasses
        import pytest

        def test_gpu(gpu):
            assert gpu.cuda_index == 0
            assert gpu.device == "cuda:0"
            assert gpu.nvml_index == 1
            assert gpu.uuid == {L4["uuid"]!r}
            assert gpu.name == "NVIDIA L4"
            assert gpu.label == "cuda:0 (NVIDIA L4)"
            assert gpu.capability == (8, 9)
            assert gpu.bf16 is True
            assert gpu.is_mig is False
            assert gpu.total_bytes == {int(22.5 * GIB)}
            assert gpu.free_bytes == {int(14.7 * GIB)}
            assert round(gpu.free_gib, 1) == 14.7
            assert gpu.driver_version == "580.159.04"
            assert gpu.cuda_driver_version == 13000
            assert gpu.cuda_driver_version_str == "13.0"
            with pytest.raises(dataclasses.FrozenInstanceError):
                gpu.free_bytes = 0

        def test_gpus(gpus):
            assert [g.name for g in gpus] == ["NVIDIA L4"]

        @pytest.mark.requires_vram(1)
        def test_marker_and_fixture(gpu):
            assert gpu.name == "NVIDIA L4"
        """,
    )
    assert all(o == "passed" for o, _ in r.values()), r


def test_gpus_fixture_order_and_override(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[L4, T4, A100_MIG])
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def gpu(gpus):
            return gpus[-1]  # a user overrides which GPU a test gets
        """
    )
    r = outcomes(
        pytester,
        """
        def test_gpus(gpus):
            assert [(g.cuda_index, g.nvml_index, g.is_mig) for g in gpus] == [
                (0, 0, False), (1, 1, False), (2, 2, True)]

        def test_override(gpu):
            assert gpu.is_mig and gpu.uuid.startswith("MIG-aaaa")
        """,
    )
    assert all(o == "passed" for o, _ in r.values()), r


def test_plugin_disabled_leaves_markers_unknown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("import pytest\n@pytest.mark.requires_vram(1)\ndef test_a(): pass\n")
    # A subprocess: in-process, pytest's mark generator remembers markers from this session.
    result = pytester.runpytest_subprocess("-p", "no:unsloth", "--strict-markers")
    result.stdout.fnmatch_lines(["*'requires_vram' not found in `markers` configuration*"])


# ----------------------------------------------------------------------------------------------
# GPU machine: the real H100 through real NVML


def _real_free_bytes() -> tuple[int, str]:
    from pytest_unsloth.gpu import read_snapshot

    snap = read_snapshot()
    assert snap.available, snap.error
    dev = snap.visible[0]
    return dev.free_bytes, dev.name


@pytest.mark.gpu
def test_requires_vram_just_under_and_over_real_free(pytester: pytest.Pytester) -> None:
    free, name = _real_free_bytes()
    under = (free - GIB // 2) / GIB
    over = (free + GIB // 2) / GIB
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.requires_vram({under!r})
        def test_under(): pass

        @pytest.mark.requires_vram({over!r})
        def test_over(): pass

        @pytest.mark.requires_vram({over!r}, free=False)
        def test_capacity(): pass
        """
    )
    # A subprocess: this process may hold CUDA memory from other tests.
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", timeout=120)
    print(result.stdout.str())
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(
        [f"SKIPPED * needs * GiB free on cuda:0 ({name}), has * GiB free of *"]
    )


@pytest.mark.gpu
def test_gpu_fixture_against_torch(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import torch

        from pytest_unsloth.gpu import read_snapshot

        GIB = 1024 ** 3
        FREE_AT_IMPORT = read_snapshot().visible[0].free_bytes  # before any CUDA context

        def test_0_cuda_context():
            # Create the CUDA context first: it takes memory that NVML and CUDA both then see.
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()

        def test_fields(gpu, gpus):
            props = torch.cuda.get_device_properties(gpu.cuda_index)
            assert len(gpus) == torch.cuda.device_count()
            assert gpu.name == props.name
            assert gpu.capability == (props.major, props.minor)
            assert gpu.bf16 == torch.cuda.is_bf16_supported()
            assert abs(gpu.total_bytes - props.total_memory) < GIB
            assert str(props.uuid) in gpu.uuid
            free, total = torch.cuda.mem_get_info(gpu.cuda_index)
            assert abs(gpu.free_bytes - gpu.torch_cached_bytes - free) < GIB // 2
            print("GPU", gpu)

        def test_torch_cache_counts_as_free(gpu):
            x = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
            del x  # freed into torch's cache: NVML still counts it used

        def test_after_cache(gpu):
            assert gpu.torch_cached_bytes >= 2 * GIB
            free, _ = torch.cuda.mem_get_info(gpu.cuda_index)
            assert abs(gpu.free_bytes - (free + gpu.torch_cached_bytes)) < GIB // 2

        # NVML now says about 2.5 GiB less is free than at import (context + the 2 GiB cache);
        # counting torch's cache as free, only the context is missing, so this must pass.
        @pytest.mark.requires_vram((FREE_AT_IMPORT - GIB) / GIB)
        def test_marker_counts_torch_cache():
            assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() >= 2 * GIB
        """
    )
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", timeout=300)
    print(result.stdout.str())
    result.assert_outcomes(passed=5)
