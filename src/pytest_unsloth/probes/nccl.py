"""The ``nccl`` probe: one ``nccl_rank`` process per visible GPU, retried with NCCL's escape
hatches when it fails.

Attempt 1 runs with the user's environment. When it fails or times out, attempt 2 adds
``NCCL_P2P_DISABLE=1`` (P2P broken under virtualisation or an IOMMU) and attempt 3
``NCCL_IB_DISABLE=1`` (InfiniBand probed where there is none); the first that passes names the
variable the user should export. Every rank is killed at the attempt's deadline, and a rank
that fails makes the others be killed at once (they would otherwise wait in init for it).
Rank output goes to files, not pipes: an undrained pipe (NCCL_DEBUG=INFO) blocks a rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from pytest_unsloth.probes import emit, stage
from pytest_unsloth.probes.protocol import RANK_MARK, parse

BACKEND_ENV = "PYTEST_UNSLOTH_NCCL_BACKEND"
TIMEOUT_ENV = "PYTEST_UNSLOTH_NCCL_TIMEOUT"
NUMEL_ENV = "PYTEST_UNSLOTH_NCCL_NUMEL"
RANK_ARGV: tuple[str, ...] = ("-m", "pytest_unsloth.probes.nccl_rank")
# (label, variables) tried in order; the first that passes is named in the fix.
ATTEMPTS: tuple[tuple[str, Mapping[str, str]], ...] = (
    ("as configured", {}),
    ("NCCL_P2P_DISABLE=1", {"NCCL_P2P_DISABLE": "1"}),
    ("NCCL_IB_DISABLE=1", {"NCCL_IB_DISABLE": "1"}),
)
GRACE_S = 5.0  # spent after the deadline reaping killed ranks, never waiting on them


@dataclasses.dataclass
class Attempt:
    """One run of every rank under one environment."""

    label: str
    status: str  # passed | failed | timeout
    message: str
    duration: float
    stages: dict[int, str]
    result: dict[str, Any]
    log: str = ""
    killed: int = 0  # ranks still alive at the deadline (or after a peer failed), killed

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(fh: IO[str]) -> str:
    fh.flush()
    fh.seek(0)
    return fh.read()


def _is_set(env: Mapping[str, str], name: str) -> bool:
    """NCCL reads these with strtol and acts on 1 only."""
    try:
        return int(env.get(name, "").strip() or "0", 0) == 1
    except ValueError:
        return False


def _rank_env(
    world: int,
    backend: str,
    timeout: float,
    extra_env: Mapping[str, str] | None,
    base_env: Mapping[str, str] | None,
) -> dict[str, str]:
    """torchrun's variables for one attempt (RANK and LOCAL_RANK are added per rank)."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        **{BACKEND_ENV: backend, TIMEOUT_ENV: f"{timeout:g}"},
    )
    env.update(extra_env or {})
    return env


def _watch(procs: Sequence[subprocess.Popen[str]], deadline: float) -> bool:
    """Wait until every rank exits, one fails, or the deadline passes (True: timed out)."""
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return False
        if any(c not in (None, 0) for c in codes):
            return False  # a peer failed: the others would wait for it until the deadline
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)


def _stop(procs: Sequence[subprocess.Popen[str]]) -> int:
    """Kill the ranks still running and reap them all; how many had to be killed."""
    killed = 0
    for p in procs:
        if p.poll() is None:
            p.kill()
            killed += 1
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=GRACE_S)
    return killed


def _read_rank(rank: int, out: IO[str], err: IO[str]) -> tuple[str, dict[str, Any] | None, str]:
    """(stage reached, result or None, stderr tail) of one rank; a protocol error fails it."""
    said = parse(_read(out), RANK_MARK)
    result = said.result
    if said.error is not None:
        result = {"status": "failed", "error": f"broke the {RANK_MARK} line protocol: {said.error}"}
    text = _read(err).strip()
    return said.stage or "start", result, f"[rank {rank}] " + text[-1200:] if text else ""


@dataclasses.dataclass(frozen=True)
class _Ended:
    """How the ranks of one attempt ended."""

    stages: dict[int, str]
    results: dict[int, dict[str, Any]]
    codes: dict[int, int | None]
    log: str
    timed_out: bool
    killed: int
    duration: float


def _verdict(label: str, world: int, timeout: float, end: _Ended) -> Attempt:
    """The attempt's status and message from how its ranks ended."""
    stages, results = end.stages, end.results
    failed = {r: res for r, res in results.items() if res.get("status") != "passed"}
    rank0 = results.get(0, {})
    if not end.timed_out and not failed and len(results) == world and end.killed == 0:
        return Attempt(label, "passed", _passed_text(rank0, world), end.duration, stages, rank0)
    where = ", ".join(f"rank {r} in '{s}'" for r, s in stages.items())
    if failed:
        r, res = min(failed.items())
        msg = f"rank {r} failed in '{stages[r]}': {res.get('error', '?')}"
    elif end.timed_out:
        msg = f"timed out after {timeout:g} s ({where}); every rank was killed"
    else:
        dead = [
            f"rank {r} exited with code {code} in '{stages[r]}'"
            for r, code in end.codes.items()
            if r not in results
        ]
        msg = "; ".join(dead) or f"ranks stopped early ({where})"
    status = "timeout" if end.timed_out and not failed else "failed"
    return Attempt(label, status, msg, end.duration, stages, rank0, end.log, end.killed)


def run_ranks(
    world: int,
    backend: str,
    timeout: float,
    extra_env: Mapping[str, str] | None = None,
    base_env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    label: str = "as configured",
) -> Attempt:
    """Start ``world`` ranks, wait at most ``timeout`` seconds, kill whatever is left."""
    env = _rank_env(world, backend, timeout, extra_env, base_env)
    cmd = [sys.executable, *(argv or RANK_ARGV)]
    procs: list[subprocess.Popen[str]] = []
    logs: list[tuple[IO[str], IO[str]]] = []
    with contextlib.ExitStack() as files:
        start = time.monotonic()
        timed_out = False
        try:
            for rank in range(world):
                out, err = (
                    files.enter_context(tempfile.TemporaryFile("w+", errors="replace"))
                    for _ in range(2)
                )
                logs.append((out, err))
                rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=rank_env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        text=True,
                    )
                )
            timed_out = _watch(procs, start + timeout)
        except OSError as exc:
            for p in procs:
                p.kill()
            return Attempt(label, "failed", f"could not start a rank: {exc}", 0.0, {}, {})
        finally:
            killed = _stop(procs)
        duration = time.monotonic() - start
        ranks = [_read_rank(rank, out, err) for rank, (out, err) in enumerate(logs)]
    end = _Ended(
        stages={r: stage_name for r, (stage_name, _, _) in enumerate(ranks)},
        results={r: res for r, (_, res, _) in enumerate(ranks) if res is not None},
        codes={r: p.returncode for r, p in enumerate(procs)},
        log="\n".join(log for _, _, log in ranks if log)[-3000:],
        timed_out=timed_out,
        killed=killed,
        duration=duration,
    )
    return _verdict(label, world, timeout, end)


def _passed_text(rank0: Mapping[str, Any], world: int) -> str:
    backend = rank0.get("backend", "?")
    version = f" {rank0['nccl']}" if rank0.get("nccl") else ""
    mib = int(rank0.get("bytes", 0)) // (1024 * 1024)
    peer = rank0.get("peer_copy") or {}
    peer_text = f"; peer copies {', '.join(f'{k} {v}' for k, v in peer.items())}" if peer else ""
    return (
        f"{backend}{version} across {world} ranks: all_reduce verified, P2P send/recv ring "
        f"verified{peer_text}; bus bandwidth {rank0.get('busbw_gbps', '?')} GB/s "
        f"(all_reduce of {mib} MiB fp32)"
    )


def run_attempts(
    world: int,
    backend: str,
    timeout: float,
    base_env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> list[Attempt]:
    """The attempts in order, stopping at the first that passes (an already-set escape hatch
    is not tried again)."""
    env = dict(os.environ if base_env is None else base_env)
    done: list[Attempt] = []
    for label, extra in ATTEMPTS:
        if extra and all(_is_set(env, k) for k in extra):
            continue
        stage(f"ranks {label}")
        attempt = run_ranks(world, backend, timeout, extra, env, argv, label)
        done.append(attempt)
        if attempt.status == "passed":
            break
    return done


def summarize(attempts: Sequence[Attempt], world: int, timeout: float) -> dict[str, Any]:
    """The probe's result payload from the attempts."""
    data: dict[str, Any] = {
        "world": world,
        "timeout": timeout,
        "attempts": [a.to_json() for a in attempts],
    }
    first, last = attempts[0], attempts[-1]

    def found(a: Attempt) -> dict[str, Any]:
        return {k: v for k, v in a.result.items() if k != "status"}

    if first.status == "passed":
        data.update(found(first))
        return emit("passed", first.message, **data)
    data["first_failure"] = first.message
    if last.status == "passed":
        data.update(found(last))
        data["fixed_by"] = last.label
        return emit(
            "failed",
            f"failed as configured ({first.message}); passed with {last.label}",
            **data,
        )
    tried = ", ".join(a.label for a in attempts[1:])
    more = f"; also failed with {tried}" if tried else ""
    return emit("failed", f"{first.message}{more}", **data)


def parent_limits(attempt_timeout: float, env: dict[str, str]) -> tuple[float, dict[str, str]]:
    """The probe child's own deadline (room for every attempt) and its environment."""
    env[TIMEOUT_ENV] = f"{attempt_timeout:g}"
    # Each attempt is bounded by attempt_timeout (plus reaping); 30 s covers importing torch.
    return len(ATTEMPTS) * (attempt_timeout + GRACE_S) + 30.0, env


def probe_nccl() -> dict[str, Any]:
    """NCCL between every visible GPU through torch.distributed, retried with escape hatches."""
    stage("import torch")
    import torch
    import torch.distributed as dist

    backend = os.environ.get(BACKEND_ENV, "nccl")
    timeout = float(os.environ.get(TIMEOUT_ENV, "60"))
    if not dist.is_available():
        return emit("failed", f"torch {torch.__version__} was built without torch.distributed")
    if backend == "nccl":
        if not dist.is_nccl_available():
            return emit(
                "failed",
                f"torch {torch.__version__} has no NCCL backend (CPU build or Windows)",
                reason="no-nccl",
            )
        if not torch.cuda.is_available():
            return emit("skipped", "torch cannot use a GPU here (see unsloth-env::cuda)")
        world = torch.cuda.device_count()
    else:
        world = int(os.environ.get("PYTEST_UNSLOTH_NCCL_WORLD", "2"))
    if world < 2:
        return emit("skipped", f"needs 2 GPUs visible to CUDA, {world} visible")
    attempts = run_attempts(world, backend, timeout)
    return summarize(attempts, world, timeout)
