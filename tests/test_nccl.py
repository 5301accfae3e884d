"""The nccl probe's rank runner (real subprocesses, real timeouts), retries, check and opt-in."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_unsloth.checks import nccl as nccl_check
from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.probes import nccl
from pytest_unsloth.probes.protocol import ProbeResult
from pytest_unsloth.probes.runner import ProbeStore
from pytest_unsloth.settings import Settings

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="the nccl check skips first when torch is not installed (the minimal env)",
)

H200 = {"name": "NVIDIA H200", "capability": [9, 0], "total_gib": 139.8, "free_gib": 139.0}

# A stand-in rank: speaks the rank protocol; what it does is decided by FAKE_RANK_MODE and the
# NCCL_* variables the runner sets, so retries can be observed without GPUs.
FAKE_RANK = """
import json, os, sys, time

mode = os.environ.get("FAKE_RANK_MODE", "pass")
rank = int(os.environ["RANK"])
open(os.path.join(os.environ["FAKE_RANK_DIR"], f"pid-{rank}-{os.getpid()}"), "w").close()
print("@@unsloth-rank stage init_process_group", flush=True)
def result(**r):
    print("@@unsloth-rank result " + json.dumps(r), flush=True)
if mode == "hang" or (mode == "rank0-hangs" and rank == 0):
    time.sleep(600)
if mode == "rank1-fails" and rank == 1:
    result(status="failed", error="RuntimeError: NCCL error: unhandled system error")
    sys.exit(3)
needs = os.environ.get("FAKE_RANK_NEEDS")
if needs and os.environ.get(needs) != "1":
    if rank == 0:
        time.sleep(600)  # a broken transport hangs rather than fails
    result(status="failed", error="RuntimeError: NCCL timeout")
    sys.exit(3)
result(status="passed", backend="fake", busbw_gbps=123.4, bytes=64 * 1024 * 1024)
"""


@pytest.fixture
def fake_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Path]:
    script = tmp_path / "fake_rank.py"
    script.write_text(textwrap.dedent(FAKE_RANK))
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("FAKE_RANK_DIR", str(pids))
    for var in ("NCCL_P2P_DISABLE", "NCCL_IB_DISABLE"):
        monkeypatch.delenv(var, raising=False)
    return [str(script)], pids


def _alive(pids: Path) -> list[int]:
    out = []
    for f in pids.iterdir():
        pid = int(f.name.split("-")[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        out.append(pid)
    return out


def test_gloo_ranks_really_all_reduce_and_copy() -> None:
    """The real rank code over torch.distributed's gloo backend on the CPU."""
    pytest.importorskip("torch.distributed")
    attempt = nccl.run_ranks(2, "gloo", 120, {nccl.NUMEL_ENV: str(64 * 1024)})
    assert attempt.status == "passed", attempt
    assert attempt.message.startswith(
        "gloo across 2 ranks: all_reduce verified, P2P send/recv ring verified; bus bandwidth "
    )
    assert attempt.message.endswith("GB/s (all_reduce of 0 MiB fp32)")
    assert attempt.result["p2p"] == "1->0 ok"
    assert attempt.result["busbw_gbps"] > 0
    assert attempt.stages == {0: "destroy_process_group", 1: "destroy_process_group"}


def test_hung_ranks_are_killed_at_the_timeout(fake_rank: tuple[list[str], Path]) -> None:
    argv, pids = fake_rank
    start = time.monotonic()
    attempt = nccl.run_ranks(2, "gloo", 2.0, {"FAKE_RANK_MODE": "hang"}, argv=argv)
    elapsed = time.monotonic() - start
    assert attempt.status == "timeout"
    assert attempt.message == (
        "timed out after 2 s (rank 0 in 'init_process_group', rank 1 in 'init_process_group'); "
        "every rank was killed"
    )
    assert attempt.killed == 2
    assert 2.0 <= elapsed < 2.0 + nccl.GRACE_S
    assert len(list(pids.iterdir())) == 2 and _alive(pids) == []


def test_a_failing_rank_stops_the_others_at_once(fake_rank: tuple[list[str], Path]) -> None:
    argv, pids = fake_rank
    start = time.monotonic()
    attempt = nccl.run_ranks(2, "gloo", 60.0, {"FAKE_RANK_MODE": "rank1-fails"}, argv=argv)
    assert time.monotonic() - start < 20
    assert attempt.status == "failed"
    assert attempt.message == (
        "rank 1 failed in 'init_process_group': RuntimeError: NCCL error: unhandled system error"
    )
    assert _alive(pids) == []


def test_rank_that_crashes_without_a_result(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text("import os\nos._exit(7 if os.environ['RANK'] == '1' else 0)\n")
    attempt = nccl.run_ranks(2, "gloo", 30.0, argv=[str(script)])
    assert attempt.status == "failed"
    assert "rank 1 exited with code 7 in 'start'" in attempt.message


@pytest.mark.parametrize("needs", ["NCCL_P2P_DISABLE", "NCCL_IB_DISABLE"])
def test_retry_names_the_variable_that_made_it_pass(
    fake_rank: tuple[list[str], Path], monkeypatch: pytest.MonkeyPatch, needs: str
) -> None:
    argv, _ = fake_rank
    monkeypatch.setenv("FAKE_RANK_NEEDS", needs)
    attempts = nccl.run_attempts(2, "gloo", 2.0, argv=argv)
    labels = [a.label for a in attempts]
    assert labels[0] == "as configured" and labels[-1] == f"{needs}=1"
    assert [a.status for a in attempts][-1] == "passed"
    assert attempts[0].status == "failed"  # rank 1 failed, so rank 0 was not waited for
    payload = nccl.summarize(attempts, 2, 2.0)
    assert payload["status"] == "failed"
    assert payload["data"]["fixed_by"] == f"{needs}=1"
    assert payload["message"].startswith("failed as configured (rank 1 failed in")
    assert payload["message"].endswith(f"passed with {needs}=1")


def test_an_escape_hatch_already_set_is_not_tried_again(
    fake_rank: tuple[list[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv, _ = fake_rank
    monkeypatch.setenv("FAKE_RANK_MODE", "rank1-fails")
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    attempts = nccl.run_attempts(2, "gloo", 5.0, argv=argv)
    assert [a.label for a in attempts] == ["as configured", "NCCL_IB_DISABLE=1"]
    payload = nccl.summarize(attempts, 2, 5.0)
    assert payload["message"] == (
        "rank 1 failed in 'init_process_group': RuntimeError: NCCL error: unhandled system "
        "error; also failed with NCCL_IB_DISABLE=1"
    )
    assert "fixed_by" not in payload["data"]


def test_passing_first_time_is_one_attempt(fake_rank: tuple[list[str], Path]) -> None:
    argv, _ = fake_rank
    attempts = nccl.run_attempts(2, "gloo", 10.0, argv=argv)
    payload = nccl.summarize(attempts, 2, 10.0)
    assert payload["status"] == "passed"
    assert payload["message"].endswith("bus bandwidth 123.4 GB/s (all_reduce of 64 MiB fp32)")
    assert len(payload["data"]["attempts"]) == 1


def test_probe_limits_leave_room_for_every_attempt() -> None:
    store = ProbeStore(Settings(nccl_timeout=20.0))
    timeout, env = store._limits("nccl")
    assert timeout == 3 * (20.0 + nccl.GRACE_S) + 30.0
    assert env is not None and env[nccl.TIMEOUT_ENV] == "20"
    assert store._limits("torch") == (300.0, None)


# ----------------------------------------------------------------------------------------------
# the check


def _ctx(tmp_path: Path, result: ProbeResult) -> CheckContext:
    ctx = CheckContext(Settings(), tmp_path)
    ctx.probe = lambda name: result  # type: ignore[method-assign]
    return ctx


@needs_torch
def test_check_passes_with_the_probe_detail(tmp_path: Path) -> None:
    res = ProbeResult("nccl", "passed", "nccl 2.27.5 across 2 ranks: ... 340.1 GB/s")
    assert nccl_check.check_nccl(_ctx(tmp_path, res)) == res.message


@needs_torch
def test_check_fails_when_a_direct_peer_copy_lost_data(tmp_path: Path) -> None:
    data = {"peer_copy": {"0->1": "corrupt (peer access)"}}
    res = ProbeResult("nccl", "passed", "nccl 2.27.5 across 2 ranks: ...", data=data)
    with pytest.raises(CheckFailed) as exc:
        nccl_check.check_nccl(_ctx(tmp_path, res))
    assert exc.value.found == "direct GPU-to-GPU copies lost data: cuda:0 -> cuda:1 corrupt " + (
        "(peer access)"
    )
    assert "NCCL_P2P_DISABLE=1" in exc.value.fix and "DMAR" in exc.value.fix


@needs_torch
def test_check_names_the_variable_in_the_fix(tmp_path: Path) -> None:
    payload = nccl.summarize(
        [
            nccl.Attempt("as configured", "timeout", "timed out after 60 s (...)", 60, {}, {}),
            nccl.Attempt("NCCL_P2P_DISABLE=1", "passed", "ok", 9, {}, {"busbw_gbps": 20.0}),
        ],
        2,
        60.0,
    )
    res = ProbeResult("nccl", payload["status"], payload["message"], data=payload["data"])
    with pytest.raises(CheckFailed) as exc:
        nccl_check.check_nccl(_ctx(tmp_path, res))
    f = exc.value
    assert f.found == (
        "NCCL between 2 GPUs timed out after 60 s (...); it passed with NCCL_P2P_DISABLE=1"
    )
    assert f.fix.startswith("export NCCL_P2P_DISABLE=1 before launching training")


@needs_torch
def test_check_failure_without_a_way_out_points_at_the_log(tmp_path: Path) -> None:
    attempt = nccl.Attempt(
        "as configured",
        "failed",
        "rank 0 failed in 'init_process_group': DistBackendError: NCCL error",
        3,
        {},
        {},
        log="[rank 0] Traceback...\nncclSystemError: Bad interface name nope0",
    )
    payload = nccl.summarize([attempt], 2, 60.0)
    res = ProbeResult("nccl", "failed", payload["message"], data=payload["data"])
    with pytest.raises(CheckFailed) as exc:
        nccl_check.check_nccl(_ctx(tmp_path, res))
    assert "(stderr: ncclSystemError: Bad interface name nope0)" in exc.value.found
    assert "NCCL_SOCKET_IFNAME" in exc.value.fix


@needs_torch
def test_check_skips_with_the_probes_reason(tmp_path: Path) -> None:
    res = ProbeResult("nccl", "skipped", "needs 2 visible GPUs, 1 visible")
    with pytest.raises(CheckSkipped, match="needs 2 visible GPUs, 1 visible"):
        nccl_check.check_nccl(_ctx(tmp_path, res))


def test_opt_in(tmp_path: Path) -> None:
    reason = nccl_check.opt_in_reason((), {"HOME": str(tmp_path)})
    assert reason is not None and reason.startswith("opt-in:") and "--unsloth-checks nccl" in reason
    assert nccl_check.opt_in_reason(("nccl",), {}) is None
    assert nccl_check.opt_in_reason((), {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}) is None
    cfg = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    assert nccl_check.opt_in_reason((), {"HF_HOME": str(tmp_path / "hf")}) is None
    cfg.write_text("distributed_type: 'NO'\nnum_processes: 1\n")
    assert nccl_check.opt_in_reason((), {"HF_HOME": str(tmp_path / "hf")}) is not None


# ----------------------------------------------------------------------------------------------
# end to end in pytest runs (fake NVML; the probe child imports the real CPU torch)


def test_nccl_item_is_opt_in(
    fake_nvml: Callable[..., Any], pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in nccl_check.LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(pytester.path / "hf"))
    fake_nvml(gpus=[H200, H200])
    result = pytester.runpytest("--unsloth-env", "-k", "nccl", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines(["*unsloth-env::nccl: disabled: opt-in: *--unsloth-checks nccl*"])


@needs_torch
def test_nccl_selected_runs_the_probe_and_fails_on_a_cpu_torch(
    fake_nvml: Callable[..., Any], pytester: pytest.Pytester
) -> None:
    fake_nvml(gpus=[H200, H200])
    result = pytester.runpytest_subprocess(
        "--unsloth-env", "--unsloth-checks", "nccl", "-p", "no:cacheprovider", timeout=120
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["found: torch * has no NCCL backend (CPU build or Windows)"])


@needs_torch
def test_requires_kernel_nccl(fake_nvml: Callable[..., Any], pytester: pytest.Pytester) -> None:
    fake_nvml(gpus=[H200])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_kernel("nccl")
        def test_ddp():
            pass
        """
    )
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*needs a working nccl; its probe did not run: needs 2 visible GPUs, 1 visible*"]
    )


def test_rank_module_reports_a_failure_as_a_result(tmp_path: Path) -> None:
    """The real rank child with a bad world size fails with a result line, not a hang."""
    import subprocess

    env = dict(os.environ, RANK="0", WORLD_SIZE="x", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-m", "pytest_unsloth.probes.nccl_rank"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 3
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("@@unsloth-rank result"))
    assert json.loads(line.split(" ", 2)[2])["error"].startswith("ValueError: invalid literal")


# ----------------------------------------------------------------------------------------------
# on the lent two-GPU machine (UNSLOTH_TEST_GPU=1)


@pytest.mark.gpu
def test_real_nccl_between_two_gpus() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two visible GPUs")
    attempt = nccl.run_ranks(torch.cuda.device_count(), "nccl", 120)
    assert attempt.status == "passed", attempt
    assert attempt.result["busbw_gbps"] > 1.0
    assert all(v.startswith("ok") for v in attempt.result["peer_copy"].values())
    print(attempt.message)


@pytest.mark.gpu
def test_real_nccl_broken_transport_fails_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two visible GPUs")
    env = dict(
        os.environ, NCCL_SOCKET_IFNAME="nonexistent0", NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1"
    )
    start = time.monotonic()
    attempt = nccl.run_ranks(2, "nccl", 30, base_env=env)
    assert time.monotonic() - start < 30 + nccl.GRACE_S + 1
    assert attempt.status in ("failed", "timeout"), attempt
    print(attempt.message, attempt.log[-800:])
