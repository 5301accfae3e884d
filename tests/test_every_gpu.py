"""Issue 17: the environment checks see every GPU, whatever xdist pinning gave the worker.

Fake NVML with two GPUs of different models (one of them broken or short of memory), a fake
``unsloth`` package whose import fails only when its child is pinned to the broken GPU, and real
xdist workers pinned with ``--unsloth-gpus-per-worker=1``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distfake import write_dist
from gpuspecs import fake_gpu
from pytest_unsloth.checks.per_gpu import GpuGroup, combine, gpu_groups
from pytest_unsloth.gpu import read_snapshot
from pytest_unsloth.probes.protocol import ProbeResult
from pytest_unsloth.probes.runner import Pin

pytest.importorskip("xdist")

H200 = fake_gpu("H200", uuid="GPU-00000000-aaaa-bbbb-cccc-000000000000", free_gib=139.0)
L4 = fake_gpu("L4", uuid="GPU-11111111-aaaa-bbbb-cccc-111111111111", free_gib=22.0)
# Imports fine on any GPU but the L4: the probe child sees only its pinned GPU.
FAKE_UNSLOTH = f"""
import os
if os.environ.get("CUDA_VISIBLE_DEVICES") == {L4["uuid"]!r}:
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
with open(os.environ["UNSLOTH_FAKE_LOG"], "a") as fh:
    fh.write(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>") + "\\n")
__version__ = "2026.10.9"
class FastLanguageModel:
    pass
"""


@pytest.fixture(autouse=True)
def _outside_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    """The outer session's xdist variables must not leak into the child runs."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def fake_unsloth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake unsloth install first on PYTHONPATH; returns the log of pins it was imported under."""
    site = tmp_path / "site"
    write_dist(site, "unsloth", "2026.10.9", module="unsloth", code=FAKE_UNSLOTH)
    log = tmp_path / "unsloth-imports.log"
    monkeypatch.setenv("UNSLOTH_FAKE_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return log


def run_env(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    """``pytest --unsloth-env`` in a subprocess; returns the run and the JSON report's checks."""
    result = pytester.runpytest_subprocess(
        "--unsloth-env",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",
        "--unsloth-report=report.json",
        "-rA",
        *args,
        timeout=180,
    )
    data = json.loads((pytester.path / "report.json").read_text())
    return result, {c["name"]: c for c in data["checks"]}


def test_pinned_workers_check_every_gpu(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], fake_unsloth: Path
) -> None:
    fake_nvml(gpus=[H200, {**L4, "free_gib": 3.0}])
    result, checks = run_env(
        pytester,
        "--unsloth-checks=vram,bf16,unsloth",
        "--unsloth-min-free-vram=10",
        "-n",
        "2",
        "--unsloth-gpus-per-worker=1",
    )
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    # vram: both GPUs read, the short one named (a worker pinned to GPU 0 alone would pass).
    assert checks["vram"]["status"] == "failed"
    assert "cuda:1 (NVIDIA L4" in checks["vram"]["found"]
    assert "cuda:0 (NVIDIA H200" not in checks["vram"]["found"]
    assert checks["bf16"]["status"] == "passed"
    assert "2 GPU(s)" in checks["bf16"]["message"]
    # unsloth: probed once per kind of GPU, each child pinned to one GPU of that kind.
    unsloth = checks["unsloth"]
    assert unsloth["status"] == "failed"
    assert "on cuda:1 (NVIDIA L4, sm_89): " in unsloth["found"]
    assert "no kernel image" in unsloth["found"]
    assert "passed on cuda:0 (NVIDIA H200, sm_90)" in unsloth["found"]
    covers = {c["gpus"]: c["status"] for c in unsloth["probes"][0]["gpus"]}
    assert covers == {
        "cuda:0 (NVIDIA H200, sm_90)": "passed",
        "cuda:1 (NVIDIA L4, sm_89)": "failed",
    }
    assert fake_unsloth.read_text().split() == [H200["uuid"]]


def test_same_model_gpus_probe_once(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], fake_unsloth: Path
) -> None:
    second = {**H200, "uuid": "GPU-22222222-aaaa-bbbb-cccc-222222222222"}
    fake_nvml(gpus=[H200, second])
    result, checks = run_env(
        pytester, "--unsloth-checks=unsloth,vram", "-n", "2", "--unsloth-gpus-per-worker=1"
    )
    assert checks["unsloth"]["status"] == "passed", result.stdout.str()
    assert "(on cuda:0, cuda:1 (NVIDIA H200, sm_90))" in checks["unsloth"]["message"]
    assert fake_unsloth.read_text().split() == [H200["uuid"]]
    assert "cuda:0" in checks["vram"]["message"] and "cuda:1" in checks["vram"]["message"]


def test_worker_pinned_to_no_gpu_still_checks_the_machine(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], fake_unsloth: Path
) -> None:
    """Three workers, two GPUs: gw2 is pinned to none; its checks still see both GPUs."""
    fake_nvml(gpus=[H200, {**H200, "uuid": "GPU-33333333-aaaa-bbbb-cccc-333333333333"}])
    pytester.makepyfile("def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass\n")
    result, checks = run_env(
        pytester,
        ".",
        "--unsloth-checks=bf16,vram,unsloth",
        "-n",
        "3",
        "--unsloth-gpus-per-worker=1",
        "-W",
        "ignore::pytest.PytestConfigWarning",
    )
    assert "INTERNALERROR" not in result.stdout.str()
    for name in ("bf16", "vram", "unsloth"):
        assert checks[name]["status"] == "passed", checks[name]
    assert "hides all" not in result.stdout.str()


def test_without_xdist_the_process_view_is_kept(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any], fake_unsloth: Path
) -> None:
    fake_nvml(gpus=[H200, L4])
    _, checks = run_env(pytester, "--unsloth-checks=unsloth", "-p", "no:xdist")
    # One probe, as before: the child inherits the process's (unset) CUDA_VISIBLE_DEVICES.
    assert checks["unsloth"]["status"] == "passed"
    assert checks["unsloth"]["message"] == "unsloth 2026.10.9 imported"
    assert fake_unsloth.read_text().split() == ["<unset>"]


def test_user_restriction_is_the_machine(
    pytester: pytest.Pytester,
    fake_nvml: Callable[..., Any],
    fake_unsloth: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The user's own CUDA_VISIBLE_DEVICES bounds what the checks look at."""
    fake_nvml(gpus=[H200, L4])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    _, checks = run_env(
        pytester, "--unsloth-checks=unsloth,vram", "-n", "2", "--unsloth-gpus-per-worker=1"
    )
    assert checks["unsloth"]["status"] == "passed"
    assert "NVIDIA L4" not in checks["vram"]["message"]


def test_combine_names_failing_gpus(fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[H200, L4, {**L4, "uuid": "GPU-44444444-aaaa-bbbb-cccc-444444444444"}])
    groups = gpu_groups(read_snapshot(environ={}))
    assert [g.label for g in groups] == [
        "cuda:0 (NVIDIA H200, sm_90)",
        "cuda:1, cuda:2 (NVIDIA L4, sm_89)",
    ]
    assert [g.pin for g in groups] == [Pin(H200["uuid"]), Pin(L4["uuid"])]
    ok = ProbeResult("triton", "passed", "triton kernel ran", duration=1.0)
    bad = ProbeResult("triton", "failed", "died with SIGSEGV", duration=2.0, stderr_tail="boom")
    merged = combine("triton", [(groups[0], ok), (groups[1], bad)])
    assert merged.status == "failed"
    assert merged.message == (
        "on cuda:1, cuda:2 (NVIDIA L4, sm_89): died with SIGSEGV; "
        "passed on cuda:0 (NVIDIA H200, sm_90)"
    )
    assert merged.stderr_tail == "boom" and merged.duration == 2.0
    skipped = ProbeResult("triton", "skipped", "triton is not installed")
    assert combine("triton", [(groups[0], skipped)]).status == "skipped"
    assert isinstance(groups[0], GpuGroup)


def test_pin_keys_are_file_safe() -> None:
    assert Pin(None).key("torch") == "torch@unset"
    assert Pin("").key("torch") == "torch@none"
    assert Pin("MIG-GPU-1/2/0").key("bitsandbytes") == "bitsandbytes@MIG-GPU-1_2_0"
    assert Pin("0,1").environ()["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "CUDA_VISIBLE_DEVICES" not in Pin(None).environ()
