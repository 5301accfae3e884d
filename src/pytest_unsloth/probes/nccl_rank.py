"""One rank of the NCCL probe: ``python -m pytest_unsloth.probes.nccl_rank``.

Started once per GPU by ``probes/nccl.py`` with torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and ``PYTEST_UNSLOTH_NCCL_BACKEND``. Everything goes
through ``torch.distributed``, the engine training uses: init with a timeout, an all_reduce whose
result is checked, a ring of peer-to-peer send/recv whose bytes are checked against a sentinel,
then a timed all_reduce for the bus bandwidth. With the ``gloo`` backend the same code runs on
the CPU, which is how CI exercises it.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

from pytest_unsloth.probes.protocol import RANK_MARK, result_line, stage_line, write_line

SENTINEL = -7.0


def stage(name: str) -> None:
    """Announce the stage this rank enters (the parent reports it on a timeout)."""
    write_line(stage_line(name, RANK_MARK), lead="")


def _env_int(name: str) -> int:
    return int(os.environ[name])


def run_rank() -> dict[str, Any]:
    """Run this rank's part; return what it found (rank 0's answer is the probe's)."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = os.environ.get("PYTEST_UNSLOTH_NCCL_BACKEND", "nccl")
    timeout = float(os.environ.get("PYTEST_UNSLOTH_NCCL_TIMEOUT", "60"))
    numel = int(os.environ.get("PYTEST_UNSLOTH_NCCL_NUMEL", str(16 * 1024 * 1024)))
    stage("import torch")
    import torch
    import torch.distributed as dist

    out: dict[str, Any] = {"rank": rank, "backend": backend, "torch": torch.__version__}
    device = _init(torch, dist, backend, rank, world, local, timeout, out)
    _check_all_reduce(torch, dist, device, rank, world)
    out["p2p"] = _check_ring(torch, dist, device, rank, world)
    if backend == "nccl" and rank == 0:
        stage("peer copy")
        out["peer_copy"] = _peer_copies(torch, local, world)
    out.update(_bandwidth(torch, dist, device, world, numel))
    stage("destroy_process_group")
    dist.destroy_process_group()
    return out


def _init(
    torch: Any,
    dist: Any,
    backend: str,
    rank: int,
    world: int,
    local: int,
    timeout: float,
    out: dict[str, Any],
) -> Any:
    """Join the process group; the device this rank works on (notes NCCL's version in out)."""
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout)}
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        # device_id makes NCCL build its communicator now, so a broken transport fails here
        # (with the stage named) rather than inside the first collective.
        kwargs["device_id"] = device
        nccl_version = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, nccl_version)) if isinstance(nccl_version, tuple) else None
    else:
        device = torch.device("cpu")
    stage("init_process_group")
    dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return device


def _check_all_reduce(torch: Any, dist: Any, device: Any, rank: int, world: int) -> None:
    """A small all_reduce whose sum is checked on every element."""
    stage("all_reduce")
    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    expected = world * (world + 1) / 2
    got = float(x[0].item())
    if not bool((x == expected).all()):
        raise AssertionError(f"all_reduce returned {got}, expected {expected:g} on every element")


def _check_ring(torch: Any, dist: Any, device: Any, rank: int, world: int) -> str:
    """A ring of P2P send/recv whose bytes are checked; what this rank received, from whom."""
    stage("p2p send/recv")
    n = 1024 * 1024
    # Each rank sends a pattern unique to it to the next rank and receives the previous rank's
    # into a sentinel-filled buffer: a copy that "succeeds" without moving bytes is caught.
    send = torch.arange(n, dtype=torch.float32, device=device) + rank * 1000.0
    recv = torch.full((n,), SENTINEL, dtype=torch.float32, device=device)
    src, dst = (rank - 1) % world, (rank + 1) % world
    ops = [dist.P2POp(dist.isend, send, dst), dist.P2POp(dist.irecv, recv, src)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    want = torch.arange(n, dtype=torch.float32, device=device) + src * 1000.0
    if not torch.equal(recv, want):
        bad = int((recv != want).sum().item())
        raise AssertionError(f"P2P recv from rank {src}: {bad} of {n} values wrong")
    return f"{src}->{rank} ok"


def _bandwidth(torch: Any, dist: Any, device: Any, world: int, numel: int) -> dict[str, Any]:
    """Time a large all_reduce: the bus bandwidth and the bytes it moved."""
    stage("bandwidth")
    y = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(y)  # warm-up: the first large collective sets up buffers
    iters = 5
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) / iters
    # nccl-tests' bus bandwidth for all_reduce: algorithm bandwidth x 2(n-1)/n.
    busbw = round(numel * 4 / elapsed * 2 * (world - 1) / world / 1e9, 2)
    return {"busbw_gbps": busbw, "bytes": numel * 4}


def _peer_copies(torch: Any, local: int, world: int) -> dict[str, str]:
    """Direct device-to-device copies from this GPU, verified against a sentinel."""
    result: dict[str, str] = {}
    n = 4 * 1024 * 1024
    for other in range(min(world, torch.cuda.device_count())):
        if other == local:
            continue
        peer = "peer access" if torch.cuda.can_device_access_peer(local, other) else "no peer"
        s = torch.arange(n, dtype=torch.float32, device=f"cuda:{local}")
        d = torch.full((n,), SENTINEL, dtype=torch.float32, device=f"cuda:{other}")
        d.copy_(s)
        torch.cuda.synchronize(local)
        torch.cuda.synchronize(other)
        ok = torch.equal(d.cpu(), s.cpu())
        result[f"{local}->{other}"] = f"{'ok' if ok else 'corrupt'} ({peer})"
    return result


def main() -> int:
    """Run the rank and print its result line."""
    try:
        result: dict[str, Any] = {"status": "passed", **run_rank()}
    except BaseException as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        # NCCL puts its cause on a later line ("Last error: Bootstrap : no socket interface").
        cause = [ln for ln in lines[1:] if "Last error" in ln or ln.startswith("nccl")]
        text = "; ".join((lines[:1] + cause[:1]) or [""])[:600]
        result = {"status": "failed", "error": f"{type(exc).__name__}: {text}"}
        import traceback

        traceback.print_exc()
    write_line(result_line(result, RANK_MARK), lead="")
    return 0 if result["status"] == "passed" else 3


if __name__ == "__main__":
    raise SystemExit(main())
