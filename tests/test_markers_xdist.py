"""xdist: --unsloth-gpus-per-worker pins each worker to its own GPUs (fake NVML, subprocesses)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("xdist")


def gpu_spec(i: int, free_gib: float = 20.0) -> dict[str, Any]:
    return {
        "name": f"FAKE GPU {i}",
        "uuid": f"GPU-{i}{i}{i}{i}0000-aaaa-bbbb-cccc-dddddddddddd",
        "total_gib": 24.0,
        "free_gib": free_gib,
        "capability": [8, 9],
    }


PIN_LOG_TESTS = """
    import os
    import pytest

    @pytest.mark.parametrize("i", range(12))
    def test_pin(i, gpus):
        with open("pins.log", "a") as fh:
            fh.write("%s|%s|%s\\n" % (
                os.environ.get("PYTEST_XDIST_WORKER", "main"),
                os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
                ",".join(str(g.nvml_index) for g in gpus),
            ))
"""


def pins(pytester: pytest.Pytester) -> dict[str, set[tuple[str, str]]]:
    """Worker id -> the (CUDA_VISIBLE_DEVICES, NVML indices) its tests saw."""
    seen: dict[str, set[tuple[str, str]]] = {}
    for line in (pytester.path / "pins.log").read_text().splitlines():
        worker, cvd, indices = line.split("|")
        seen.setdefault(worker, set()).add((cvd, indices))
    return seen


@pytest.fixture(autouse=True)
def _outside_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide this session's own xdist worker variables from the child pytest runs.

    Under ``pytest -n 2`` they would leak into a child run with ``-p no:xdist``, whose tests
    would then log the outer worker's id instead of "main".
    """
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # Hypothesis's plugin would import hypothesis (about 1.5 s) in each of these processes.
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rs", *args, timeout=120
    )


def test_each_worker_sees_its_own_gpu(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[gpu_spec(0), gpu_spec(1)])
    pytester.makepyfile(PIN_LOG_TESTS)
    result = run(pytester, "-n", "2", "--unsloth-gpus-per-worker=1")
    result.assert_outcomes(passed=12)
    assert pins(pytester) == {"gw0": {("0", "0")}, "gw1": {("1", "1")}}


def test_two_gpus_per_worker(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[gpu_spec(i) for i in range(4)])
    pytester.makepyfile(PIN_LOG_TESTS)
    result = run(pytester, "-n", "2", "--unsloth-gpus-per-worker", "2")
    result.assert_outcomes(passed=12)
    assert pins(pytester) == {"gw0": {("0,1", "0,1")}, "gw1": {("2,3", "2,3")}}


def test_pinning_honours_the_controllers_cuda_visible_devices(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpus=[gpu_spec(i) for i in range(3)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    pytester.makepyfile(PIN_LOG_TESTS)
    result = run(pytester, "-n", "2", "--unsloth-gpus-per-worker=1")
    result.assert_outcomes(passed=12)
    # Named by UUID: ordinals would mean something else once the variable is replaced.
    assert pins(pytester) == {
        "gw0": {(gpu_spec(2)["uuid"], "2")},
        "gw1": {(gpu_spec(0)["uuid"], "0")},
    }


def test_more_workers_than_gpus(pytester: pytest.Pytester, fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[gpu_spec(0), gpu_spec(1)])
    pytester.makepyfile(PIN_LOG_TESTS)
    result = run(pytester, "-n", "3", "--unsloth-gpus-per-worker=1", "--dist", "each")
    result.assert_outcomes(passed=24, skipped=12)
    result.stdout.fnmatch_lines(
        [
            "*PytestConfigWarning: --unsloth-gpus-per-worker=1 with 3 workers needs 3 GPUs, "
            "2 visible: 1 worker(s) get none and their GPU tests skip. Fix: use -n 2.*",
        ]
    )
    assert (
        "SKIPPED [12] test_more_workers_than_gpus.py:4: no usable GPU: CUDA_VISIBLE_DEVICES='' "
        "hides all 2 GPU(s) (xdist worker gw2 pinned to CUDA_VISIBLE_DEVICES='' by "
        "--unsloth-gpus-per-worker=1)"
    ) in result.stdout.lines
    assert pins(pytester) == {"gw0": {("0", "0")}, "gw1": {("1", "1")}}


def test_no_pinning_without_the_option(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[gpu_spec(0), gpu_spec(1)])
    pytester.makepyfile(PIN_LOG_TESTS)
    result = run(pytester, "-n", "2", "--dist", "each")
    result.assert_outcomes(passed=24)
    assert pins(pytester) == {"gw0": {("<unset>", "0,1")}, "gw1": {("<unset>", "0,1")}}


def test_markers_evaluate_against_the_workers_gpu(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[gpu_spec(0, free_gib=20.0), gpu_spec(1, free_gib=5.0)])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_vram(10)
        def test_needs_10(): pass

        @pytest.mark.requires_gpu(2)
        def test_needs_two(): pass
        """
    )
    result = run(pytester, "-n", "2", "--unsloth-gpus-per-worker=1", "--dist", "each")
    result.assert_outcomes(passed=1, skipped=3)
    where = "SKIPPED [1] test_markers_evaluate_against_the_workers_gpu.py"
    lines = set(result.stdout.lines)
    assert (
        f"{where}:3: needs 10.0 GiB free on cuda:0 (FAKE GPU 1), has 5.0 GiB free of 24.0 GiB"
    ) in lines
    for w in (0, 1):
        assert (
            f"{where}:6: needs 2 GPUs, has 1 (cuda:0 (FAKE GPU {w}): 8.9) (xdist worker gw{w} "
            f"pinned to CUDA_VISIBLE_DEVICES='{w}' by --unsloth-gpus-per-worker=1)"
        ) in lines


def test_option_without_xdist_warns_and_runs(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[gpu_spec(0), gpu_spec(1)])
    pytester.makepyfile(PIN_LOG_TESTS)
    result = run(pytester, "-p", "no:xdist", "--unsloth-gpus-per-worker=1")
    result.assert_outcomes(passed=12, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*--unsloth-gpus-per-worker=1 has no effect without pytest-xdist (-p no:xdist or not "
            "installed): nothing is pinned*"
        ]
    )
    assert pins(pytester) == {"main": {("<unset>", "0,1")}}


def test_option_with_xdist_but_no_workers_warns(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[gpu_spec(0)])
    pytester.makepyfile(PIN_LOG_TESTS)
    result = run(pytester, "--unsloth-gpus-per-worker=1", "-W", "error::pytest.PytestConfigWarning")
    # -W error turns the warning into a clean usage error, not an INTERNALERROR.
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: pytest-unsloth: --unsloth-gpus-per-worker=1 has no effect without xdist workers*"]
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
