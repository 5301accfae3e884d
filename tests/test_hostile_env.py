"""Hostile environments (issue 11): everything the plugin reads can be broken, and none of it may
turn into an INTERNALERROR, a traceback, or a change to a plain ``pytest`` run.

Each scenario is a real pytest subprocess over a broken environment built from files: fake
``NAME-VER.dist-info`` folders on PYTHONPATH, the fake ``pynvml`` with injected failures
(``tests/fakes/nvml/pynvml.py``), real broken ``pynvml.py`` files and stray modules named like
stack packages. Each asserts the exit code, that no INTERNALERROR or traceback appears, and which
check reports what (from the JSON report and the terminal text).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from distfake import write_dist
from gpuspecs import fake_gpu
from pytest_unsloth.util.versions import version_of
from subrun import run_pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
IMPORT_ERROR_ENV = "PYTEST_UNSLOTH_FAKE_NVML_IMPORT_ERROR"
L4 = fake_gpu("L4", uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", free_gib=20.0)
OLD = fake_gpu("T4", uuid="GPU-99999999-bbbb-cccc-dddd-eeeeeeeeeeee", free_gib=14.0)

# A user's test file touching every GPU-facing part of the plugin.
GPU_TESTS = """
import pytest

@pytest.mark.requires_gpu
def test_requires_gpu():
    pass

@pytest.mark.requires_vram(1)
def test_requires_vram():
    pass

@pytest.mark.requires_bf16
def test_requires_bf16():
    pass

def test_gpu_fixture(gpu):
    print("GPU-NAME", repr(gpu.name))

def test_gpus_fixture(gpus):
    assert gpus

def test_plain():
    pass
"""

# A project that never asked for the plugin.
PLAIN_TESTS = """
import pytest

def test_pass():
    pass

def test_fail():
    assert 1 == 2

@pytest.mark.skip(reason="not today")
def test_skip():
    pass

@pytest.mark.xfail
def test_xfail():
    assert False
"""


@dataclass
class Run:
    """One pytest subprocess run: exit code, text and the JSON report's check records."""

    ret: int
    out: str
    records: dict[str, dict[str, Any]]
    report: dict[str, Any] | None

    def status(self, name: str) -> str:
        return str(self.records[name]["status"])

    def text(self, name: str) -> str:
        rec = self.records[name]
        return " | ".join(str(rec.get(k, "")) for k in ("message", "why", "fix"))


def _run(pytester: pytest.Pytester, *args: str, report: bool = True, timeout: float = 240) -> Run:
    path = pytester.path / "unsloth-report.json"
    if path.exists():
        path.unlink()
    extra = [f"--unsloth-report={path}"] if report and "--unsloth-env" in args else []
    result, out = run_pytest(
        pytester,
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-rA",
        *extra,
        *args,
        timeout=timeout,
    )
    assert "Traceback" not in out, out
    data = json.loads(path.read_text("utf-8")) if path.exists() else None
    records = {r["name"]: r for r in data["checks"]} if data else {}
    return Run(int(result.ret), out, records, data)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on PYTHONPATH (subprocesses) and sys.path, for broken installs."""
    folder = tmp_path / "site"
    folder.mkdir()
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(folder) + (os.pathsep + old if old else ""))
    monkeypatch.syspath_prepend(str(folder))
    return folder


def raw_dist(
    site: Path,
    folder: str,
    metadata: bytes | None,
    record: bytes | str | None = b"",
) -> Path:
    """A dist-info folder with METADATA/RECORD exactly as given (``record="dir"``: a folder)."""
    info = site / folder
    info.mkdir(parents=True)
    if metadata is not None:
        (info / "METADATA").write_bytes(metadata)
    if record == "dir":
        (info / "RECORD").mkdir()
    elif isinstance(record, bytes):
        (info / "RECORD").write_bytes(record)
    return info


@pytest.fixture
def no_nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake pynvml with no driver (so the real GPU of a GPU machine does not interfere)."""
    from conftest import FAKE_NVML_DIR

    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(FAKE_NVML_DIR) + (os.pathsep + old if old else ""))
    monkeypatch.delenv("PYTEST_UNSLOTH_FAKE_NVML", raising=False)


# ----------------------------------------------------------------------------------------------
# 1. Broken metadata: one finding of the packages check, readable everywhere else.

META_CASES: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "metadata-not-utf8": (
        lambda s: raw_dist(s, "trl-1.0.dist-info", b"Name: trl\nVersion: 1.0\xff\xfe\n"),
        "trl",
        "unreadable metadata",
    ),
    "metadata-empty": (
        lambda s: raw_dist(s, "peft-0.1.dist-info", b""),
        "peft",
        "has no Version",
    ),
    "metadata-without-version": (
        lambda s: raw_dist(s, "datasets-1.0.dist-info", b"Metadata-Version: 2.1\nName: datasets\n"),
        "datasets",
        "has no Version",
    ),
    "metadata-missing": (
        lambda s: raw_dist(s, "accelerate-1.0.dist-info", None),
        "accelerate",
        "has no Version",
    ),
    "record-garbage-and-version-garbage": (
        lambda s: raw_dist(
            s,
            "tokenizers-1.0.dist-info",
            b"Name: tokenizers\nVersion: not a version\n",
            record=b"\x00\xff,,,\n" * 50,
        ),
        "tokenizers",
        "'not a version' is not a valid (PEP 440) version",
    ),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_broken_metadata_is_a_packages_finding(
    pytester: pytest.Pytester, site: Path, no_nvml: None, case: str
) -> None:
    build, name, words = META_CASES[case]
    build(site)
    pytester.makepyfile(PLAIN_TESTS)
    run = _run(pytester, "--unsloth-env", "-v", "--unsloth-checks=python,packages,pins,known-bad")
    assert run.report is not None and "unsloth: " in run.out  # header and JSON survive
    assert run.ret == 1
    assert run.status("packages") == "failed"
    assert f"{name} at {site}" in run.text("packages") and words in run.text("packages")
    assert f"pip install --force-reinstall --no-deps {name}" in run.text("packages")
    # Nowhere else: the pin arithmetic does not turn the broken install into pin noise.
    assert run.status("pins") == "passed", run.text("pins")
    assert run.status("python") == "passed"


def test_broken_torch_metadata_in_header_and_json(
    pytester: pytest.Pytester, site: Path, no_nvml: None
) -> None:
    raw_dist(site, "torch-2.0.dist-info", b"Name: torch\nVersion: 2.0\xff\n", record=None)
    pytester.makepyfile(GPU_TESTS)
    run = _run(pytester, "--unsloth-env", "-v", "--unsloth-checks=packages,cuda,driver", ".")
    assert "unsloth: no NVIDIA GPU" in run.out and "torch (unreadable metadata)" in run.out
    assert run.ret == 1
    assert run.status("packages") == "failed" and "torch at" in run.text("packages")
    assert run.report is not None and run.report["packages"]["torch"]["version"] == ""
    # The GPU tests skip for the missing GPU, not for the metadata.
    assert "no usable GPU" in run.out or "NVML" in run.out


def test_two_copies_one_broken_and_a_nameless_dist_info(
    pytester: pytest.Pytester, site: Path, no_nvml: None, tmp_path: Path
) -> None:
    second = tmp_path / "second"
    write_dist(second, "peft", "0.17.0")
    raw_dist(site, "peft-0.1.dist-info", b"Name: peft\n")  # first on the path, broken
    # METADATA without a Name: the folder's name stands for it. (A dist-info with no name at all
    # breaks importlib.metadata.entry_points() itself, so hypothesis' plugin fails in pytest's
    # startup with or without this plugin.)
    raw_dist(site, "xformers-0.0.1.dist-info", b"Version: 0.0.1\n", record="dir")
    os.environ["PYTHONPATH"] += os.pathsep + str(second)
    pytester.makepyfile(PLAIN_TESTS)
    run = _run(pytester, "--unsloth-env", "--unsloth-checks=packages,pins")
    assert run.ret == 1
    assert run.status("packages") == "failed"
    assert f"peft at {site}" in run.text("packages")
    assert run.status("pins") == "passed"
    assert run.report is not None and run.report["packages"]["xformers"]["version"] == "0.0.1"


def test_missing_or_garbage_record_keeps_the_probe_fingerprint(site: Path) -> None:
    from pytest_unsloth.gpu import read_snapshot
    from pytest_unsloth.probes.cache import fingerprint, fingerprint_inputs

    raw_dist(site, "trl-1.0.dist-info", b"Name: trl\nVersion: 1.0\n", record=None)
    raw_dist(site, "peft-1.0.dist-info", b"Name: peft\nVersion: 1.0\n", record="dir")
    raw_dist(site, "datasets-1.0.dist-info", b"Name: datasets\nVersion: 1.0\xff\n")
    inputs = fingerprint_inputs(read_snapshot())
    assert inputs["packages"]["trl"][2:] == [None, None]  # no RECORD: no stamp, no crash
    assert inputs["packages"]["peft"][0] == "1.0"
    assert inputs["packages"]["datasets"][0] == ""  # unreadable metadata: empty version
    assert fingerprint(inputs) == fingerprint(fingerprint_inputs(read_snapshot()))


# ----------------------------------------------------------------------------------------------
# 2. A broken NVML binding: NVML's words in the cuda check, the header, the markers, fixtures.

NVML_UNAVAILABLE: dict[str, tuple[dict[str, Any], str | None, str]] = {
    "import-oserror": ({"gpus": [L4]}, "OSError: libnvidia-ml.so.1: Permission denied", "OSError"),
    "import-runtimeerror": ({"gpus": [L4]}, "RuntimeError: ctypes gave up", "RuntimeError"),
    "init-raises-python-error": (
        {"gpus": [L4], "errors": {"nvmlInit": "py:PermissionError: /dev/nvidiactl"}},
        None,
        "PermissionError: /dev/nvidiactl",
    ),
    "count-raises": (
        {"gpus": [L4], "errors": {"nvmlDeviceGetCount": "py:RuntimeError: count exploded"}},
        None,
        "nvmlDeviceGetCount raised RuntimeError: count exploded",
    ),
    "count-returns-none": (
        {"gpus": [L4], "returns": {"nvmlDeviceGetCount": None}},
        None,
        "nvmlDeviceGetCount returned None",
    ),
    "second-gpu-lost": (
        {"gpus": [L4, {**L4, "uuid": "GPU-2", "errors": {"nvmlDeviceGetMemoryInfo": "GpuIsLost"}}]},
        None,
        "GPU is lost",
    ),
    "name-raises-valueerror": (
        {"gpus": [{**L4, "errors": {"nvmlDeviceGetName": "py:ValueError: bad utf-8"}}]},
        None,
        "nvmlDeviceGetName for GPU 0 raised ValueError: bad utf-8",
    ),
    "memory-info-none": (
        {"gpus": [{**L4, "returns": {"nvmlDeviceGetMemoryInfo": None}}]},
        None,
        "reading GPU 0 failed: AttributeError",
    ),
    "handle-raises-keyerror": (
        {"gpus": [{**L4, "errors": {"nvmlDeviceGetHandleByIndex": "py:KeyError: 0"}}]},
        None,
        "nvmlDeviceGetHandleByIndex for GPU 0 raised KeyError",
    ),
    "driver-not-loaded": (
        {"gpus": [L4], "init_error": "DriverNotLoaded"},
        None,
        "Driver Not Loaded",
    ),
}


@pytest.mark.parametrize("case", sorted(NVML_UNAVAILABLE))
def test_broken_nvml_reads_as_no_gpu_with_nvml_words(
    pytester: pytest.Pytester, fake_nvml: Any, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    spec, import_error, words = NVML_UNAVAILABLE[case]
    fake_nvml(**spec)
    if import_error:
        monkeypatch.setenv(IMPORT_ERROR_ENV, import_error)
    pytester.makepyfile(GPU_TESTS)
    run = _run(pytester, "--unsloth-env", "-v", "--unsloth-checks=cuda,bf16,vram", ".")
    assert run.ret == 0, run.out
    assert run.status("cuda") == "skipped"
    assert words in run.text("cuda")
    assert run.status("bf16") == run.status("vram") == "skipped"
    assert "see unsloth-env::cuda" in run.text("vram")
    header = next(ln for ln in run.out.splitlines() if ln.startswith("unsloth: "))
    assert "no NVIDIA GPU" in header and words in header
    assert run.report is not None and run.report["nvml"]["available"] is False
    assert words in run.report["nvml"]["error"]
    # Markers and fixtures skip with NVML's words; the plain test passes.
    assert "1 passed, 8 skipped" in run.out  # 5 GPU tests and the 3 check items skip
    skips = [ln for ln in run.out.splitlines() if ln.startswith("SKIPPED") and words in ln]
    assert len(skips) >= 5, run.out


def test_nvml_init_raising_a_python_error(
    pytester: pytest.Pytester, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (site / "pynvml.py").write_text(
        "class NVMLError(Exception):\n    pass\n"
        "def nvmlInit():\n    raise PermissionError(13, 'Permission denied', '/dev/nvidiactl')\n"
        "def nvmlShutdown():\n    raise RuntimeError('not initialised')\n",
        "utf-8",
    )
    pytester.makepyfile(GPU_TESTS)
    run = _run(pytester, "--unsloth-env", "--unsloth-checks=cuda", "--unsloth-require-gpu")
    assert run.ret == 1
    assert run.status("cuda") == "failed"
    assert "PermissionError: [Errno 13] Permission denied: '/dev/nvidiactl'" in run.text("cuda")
    assert "unsloth_require_gpu" in run.text("cuda") or "require-gpu" in run.text("cuda")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("def broken(:\n", "SyntaxError"),
        ("import os\nraise OSError(13, 'Permission denied')\n", "PermissionError: [Errno 13]"),
        ("X = 1\n", "is not nvidia-ml-py"),
        ("raise ImportError('libnvidia-ml.so.1: cannot open shared object file')\n", "ImportError"),
    ],
    ids=["syntax-error", "oserror-at-import", "not-nvidia-ml-py", "importerror-inside"],
)
def test_a_broken_pynvml_file_on_the_path(
    pytester: pytest.Pytester, site: Path, content: str, words: str
) -> None:
    (site / "pynvml.py").write_text(content, "utf-8")
    pytester.makepyfile(GPU_TESTS)
    run = _run(
        pytester, "--unsloth-env", "-v", "--unsloth-checks=cuda,vram", "--unsloth-strict-skips", "."
    )
    assert run.status("cuda") == "skipped"
    assert words in run.text("cuda") and str(site / "pynvml.py") in run.text("cuda")
    # Strict skips: every GPU test fails alone, with NVML's words, and the plain test passes.
    assert run.ret == 1
    assert "1 passed, 2 skipped, 5 errors" in run.out  # skipped: the two check items
    assert run.out.count("--unsloth-strict-skips: a missing resource fails") >= 5


@pytest.mark.parametrize(
    "case",
    ["shutdown-raises", "bytes-names", "process-list-unreadable", "process-list-garbage"],
)
def test_odd_but_usable_nvml_keeps_the_gpu(
    pytester: pytest.Pytester, fake_nvml: Any, case: str
) -> None:
    gpu: dict[str, Any] = {**L4, "processes": [{"pid": 4242, "used_gib": 2.0}]}
    spec: dict[str, Any] = {"gpus": [gpu]}
    if case == "shutdown-raises":
        spec["errors"] = {"nvmlShutdown": "py:RuntimeError: shutdown failed"}
    elif case == "bytes-names":
        gpu["returns"] = {
            "nvmlDeviceGetName": {"bytes": "NVIDIA L4"},
            "nvmlDeviceGetUUID": {"bytes": L4["uuid"]},
        }
        spec["returns"] = {"nvmlSystemGetDriverVersion": {"bytes": "580.1"}}
    elif case == "process-list-unreadable":
        gpu["errors"] = {"nvmlDeviceGetComputeRunningProcesses": "py:PermissionError: /proc"}
    else:
        gpu["returns"] = {"nvmlDeviceGetComputeRunningProcesses": [None, 7, "x"]}
    fake_nvml(**spec)
    pytester.makepyfile(GPU_TESTS)
    run = _run(pytester, "--unsloth-env", "-v", "-s", "--unsloth-checks=bf16,vram", ".")
    assert run.ret == 0, run.out
    assert "unsloth: GPUs: 1x NVIDIA L4" in run.out
    assert "b'" not in run.out
    assert run.status("bf16") == "passed" and run.status("vram") == "passed"
    assert "GPU-NAME 'NVIDIA L4'" in run.out
    assert "8 passed" in run.out  # six tests and the two check items


def test_memory_re_read_raising_skips_the_marker_with_the_call(
    pytester: pytest.Pytester, fake_nvml: Any
) -> None:
    nv = fake_nvml(gpus=[L4])
    pytester.makeconftest(
        f"""
        import json, pathlib, pytest

        @pytest.fixture
        def lose_gpu_after():
            yield
            # After enumeration, before the next memory read, the binding starts raising.
            spec = {json.dumps(nv.spec)}
            spec["gpus"][0]["errors"] = {{"nvmlDeviceGetMemoryInfo": "py:OSError: bus error"}}
            pathlib.Path({str(nv.path)!r}).write_text(json.dumps(spec) + " " * 64)
        """
    )
    pytester.makepyfile(
        """
        import pytest

        def test_first(gpu, lose_gpu_after):
            pass

        @pytest.mark.requires_vram(1)
        def test_vram():
            pass
        """
    )
    run = _run(pytester, "-v", report=False)
    assert run.ret == 0
    assert "1 passed, 1 skipped" in run.out
    assert "nvmlDeviceGetMemoryInfo raised OSError: bus error" in run.out


# ----------------------------------------------------------------------------------------------
# 3. Without --unsloth-env a broken environment changes nothing about a plain run.


def _outcomes(pytester: pytest.Pytester, *args: str) -> tuple[int, dict[str, int], str]:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)
    out = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in out, out
    return int(result.ret), result.parseoutcomes(), out


def _oserror_binding_and_undecodable_torch(site: Path, mp: pytest.MonkeyPatch) -> None:
    (site / "pynvml.py").write_text("raise OSError(13, 'Permission denied')\n", "utf-8")
    raw_dist(site, "torch-2.0.dist-info", b"Name: torch\nVersion: \xff\n", record=None)


def _syntax_error_binding_and_stray_torch(site: Path, mp: pytest.MonkeyPatch) -> None:
    (site / "pynvml.py").write_text("def (\n", "utf-8")
    (site / "torch.py").write_text("print('my script')\n", "utf-8")


def _not_a_binding_and_empty_metadata(site: Path, mp: pytest.MonkeyPatch) -> None:
    (site / "pynvml.py").write_text("X = 1\n", "utf-8")
    raw_dist(site, "torch-2.0.dist-info", b"")


def _hidden_gpus_and_count_raising(site: Path, mp: pytest.MonkeyPatch) -> None:
    mp.setenv("CUDA_VISIBLE_DEVICES", "-1")
    (site / "pynvml.py").write_text(
        "class NVMLError(Exception):\n    pass\n"
        "def nvmlInit():\n    pass\n"
        "def nvmlShutdown():\n    raise SystemError('shutdown')\n"
        "def nvmlSystemGetDriverVersion():\n    return b'1.0'\n"
        "def nvmlDeviceGetCount():\n    raise MemoryError('count')\n",
        "utf-8",
    )


PLAIN_BREAKAGE: dict[str, Callable[[Path, pytest.MonkeyPatch], None]] = {
    "pynvml-oserror-and-torch-metadata-not-utf8": _oserror_binding_and_undecodable_torch,
    "pynvml-syntax-error-and-stray-torch": _syntax_error_binding_and_stray_torch,
    "pynvml-not-a-binding-and-empty-metadata": _not_a_binding_and_empty_metadata,
    "hidden-gpus-and-nvml-count-raising": _hidden_gpus_and_count_raising,
}


@pytest.mark.parametrize("case", sorted(PLAIN_BREAKAGE))
@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_plain_pytest_unaffected_by_a_broken_environment(
    pytester: pytest.Pytester,
    site: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    verbose: bool,
) -> None:
    PLAIN_BREAKAGE[case](site, monkeypatch)
    pytester.makepyfile(PLAIN_TESTS)
    args = ("-v",) if verbose else ()
    ret, outcomes, out = _outcomes(pytester, *args)
    ret_off, outcomes_off, _ = _outcomes(pytester, "-p", "no:unsloth", *args)
    assert (ret, outcomes) == (ret_off, outcomes_off) == (1, outcomes_off)
    assert outcomes == {"passed": 1, "failed": 1, "skipped": 1, "xfailed": 1}
    assert "Traceback" not in out
    if verbose:
        header = next(ln for ln in out.splitlines() if ln.startswith("unsloth: "))
        assert "no NVIDIA GPU" in header


# ----------------------------------------------------------------------------------------------
# 4. A stray module named like a stack package is named as such, never "reinstall".


def test_stray_torch_py_in_the_project_folder(pytester: pytest.Pytester, no_nvml: None) -> None:
    if not HAS_TORCH:
        pytest.skip("needs torch installed (the stray file shadows it)")
    stray = pytester.path / "torch.py"
    stray.write_text("print('my experiment')\n", "utf-8")
    pytester.makepyfile(PLAIN_TESTS)
    run = _run(pytester, "--unsloth-env", "--unsloth-checks=packages")
    assert run.ret == 1
    text = run.text("packages")
    assert f"`import torch` loads {stray}" in text
    assert f"rename or remove {stray}" in text and "do not reinstall torch" in text
    assert "--force-reinstall" not in text


def test_stray_package_folder_on_pythonpath(
    pytester: pytest.Pytester, site: Path, no_nvml: None
) -> None:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers installed")
    (site / "transformers").mkdir()
    (site / "transformers" / "__init__.py").write_text("", "utf-8")
    pytester.makepyfile(PLAIN_TESTS)
    run = _run(pytester, "--unsloth-env", "--unsloth-checks=packages")
    assert run.ret == 1
    assert f"`import transformers` loads {site / 'transformers'}" in run.text("packages")
    assert "rename or remove" in run.text("packages")


def test_editable_install_is_not_a_stray(site: Path, tmp_path: Path) -> None:
    from pytest_unsloth.compat.distributions import Distributions
    from pytest_unsloth.compat.shadow import find_shadows

    # A dist-info whose own folder holds no code (an editable install points elsewhere) and a
    # code folder elsewhere on the path: not a shadow.
    write_dist(site, "unsloth", "2026.1.1")
    code = tmp_path / "src"
    (code / "unsloth").mkdir(parents=True)
    (code / "unsloth" / "__init__.py").write_text("", "utf-8")
    importlib.invalidate_caches()
    found = find_shadows(Distributions.read(), [str(code), *sys.path])
    assert [s for s in found if s.module == "unsloth"] == []
    # The same folder ahead of a real copy is one.
    (site / "unsloth").mkdir()
    (site / "unsloth" / "__init__.py").write_text("", "utf-8")
    importlib.invalidate_caches()
    found = find_shadows(Distributions.read(), [str(code), *sys.path])
    assert [(s.module, s.path) for s in found if s.module == "unsloth"] == [
        ("unsloth", str(code / "unsloth"))
    ]


@pytest.mark.slow
def test_stray_torch_breaks_the_probe_and_the_cuda_check_names_it(
    pytester: pytest.Pytester, fake_nvml: Any
) -> None:
    if not HAS_TORCH:
        pytest.skip("needs torch installed")
    fake_nvml(gpus=[L4])
    stray = pytester.path / "torch.py"
    stray.write_text("print('my experiment')\n", "utf-8")
    run = _run(pytester, "--unsloth-env", "--unsloth-checks=cuda,driver,arch")
    assert run.ret == 1
    text = run.text("cuda")
    assert run.status("cuda") == "failed"
    assert f"`import torch` loads {stray}" in text and f"rename or remove {stray}" in text
    assert "--force-reinstall" not in text
    for name in ("driver", "arch"):
        assert run.status(name) == "skipped" and "see unsloth-env::cuda" in run.text(name)


# ----------------------------------------------------------------------------------------------
# 5. One root cause, reported once.

DEPENDENTS = ("driver", "arch", "bf16", "vram", "bitsandbytes", "triton")


@pytest.mark.parametrize("cvd", ["", "-1"])
@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
def test_hidden_gpus_fail_cuda_once(
    pytester: pytest.Pytester,
    fake_nvml: Any,
    monkeypatch: pytest.MonkeyPatch,
    cvd: str,
    xdist: bool,
) -> None:
    fake_nvml(gpus=[L4, OLD])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    checks = "--unsloth-checks=cuda," + ",".join(DEPENDENTS)
    run = _run(pytester, "--unsloth-env", checks, *(["-n", "2"] if xdist else []))
    assert run.ret == 1
    failed = {n for n, r in run.records.items() if r["status"] == "failed"}
    assert failed == {"cuda"}
    assert f"CUDA_VISIBLE_DEVICES={cvd!r} hides all 2 GPU(s)" in run.text("cuda")
    assert "unset CUDA_VISIBLE_DEVICES" in run.text("cuda")
    for name in DEPENDENTS:
        if name in run.records:  # kernel checks of packages not installed skip for that
            assert run.status(name) == "skipped", name
    for name in ("driver", "arch", "bf16", "vram"):
        assert run.text(name).startswith("see unsloth-env::cuda: CUDA_VISIBLE_DEVICES"), name
    assert run.out.count("unset CUDA_VISIBLE_DEVICES") == 1


def test_require_gpu_without_nvml_fails_cuda_only(
    pytester: pytest.Pytester, fake_nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpus=[L4])
    monkeypatch.setenv(IMPORT_ERROR_ENV, "OSError: libnvidia-ml.so.1: Permission denied")
    run = _run(
        pytester, "--unsloth-env", "--unsloth-require-gpu", "--unsloth-checks=cuda,bf16,vram"
    )
    assert run.ret == 1
    assert run.status("cuda") == "failed"
    assert "no usable NVIDIA GPU" in run.text("cuda") and "Permission denied" in run.text("cuda")
    for name in ("bf16", "vram"):
        assert run.status(name) == "skipped"
        assert run.text(name).startswith("see unsloth-env::cuda: no usable NVIDIA GPU")


def test_dependent_check_alone_reports_the_cause_itself(
    pytester: pytest.Pytester, fake_nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpus=[L4])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    run = _run(pytester, "--unsloth-env", "--unsloth-checks=vram")
    # cuda is not selected: nothing to point at, so vram says it in full.
    assert run.ret == 1
    assert run.status("vram") == "failed"
    assert "CUDA_VISIBLE_DEVICES='' hides all 1 GPU(s)" in run.text("vram")


@pytest.mark.slow
def test_cpu_torch_with_a_gpu_fails_cuda_and_defers_the_torch_dependents(
    pytester: pytest.Pytester, fake_nvml: Any
) -> None:
    if not HAS_TORCH or "+cpu" not in (version_of("torch") or ""):
        pytest.skip("needs a CPU-only torch build")
    fake_nvml(gpus=[L4])
    run = _run(pytester, "--unsloth-env", "--unsloth-checks=cuda,driver,arch,bf16,bitsandbytes")
    assert run.ret == 1
    assert "CPU-only build" in run.text("cuda")
    for name in ("driver", "arch"):
        assert run.status(name) == "skipped" and "see unsloth-env::cuda" in run.text(name)
    if "bitsandbytes" in run.records and importlib.util.find_spec("bitsandbytes") is not None:
        assert run.status("bitsandbytes") == "skipped"
        assert run.text("bitsandbytes").startswith("see unsloth-env::cuda: NVML sees 1 GPU")
    # bf16 is NVML's fact about the GPU, true whatever torch is.
    assert run.status("bf16") == "passed"
