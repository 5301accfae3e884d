"""The ``nccl`` check: collectives between the visible GPUs, through the ``nccl`` probe.

Costly (one torch process per GPU), so it is opt-in: it runs when ``unsloth_checks`` names it
or when the environment shows a launcher setup (torchrun/accelerate/deepspeed variables, or an
accelerate config for several processes); otherwise its item skips saying how to turn it on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.cuda import GPU_AND_TORCH
from pytest_unsloth.checks.registry import builtin_check
from pytest_unsloth.probes.runner import stderr_summary

# Set by torchrun (and so accelerate launch / deepspeed, which use it), or by MPI launchers.
LAUNCHER_VARS = (
    "TORCHELASTIC_RUN_ID",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK",
)


def launcher_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher variables present (empty: a plain process)."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in LAUNCHER_VARS if env.get(k)}


def accelerate_config(environ: Mapping[str, str] | None = None) -> Path | None:
    """accelerate's default config file when it configures several processes, else None."""
    env = os.environ if environ is None else environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    path = Path(env.get("ACCELERATE_CONFIG_FILE") or Path(home) / "accelerate/default_config.yaml")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "num_processes":
            try:
                return path if int(value.strip()) > 1 else None
            except ValueError:
                return None
    return None


def opt_in_reason(
    selection: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> str | None:
    """None when the nccl check should run, else the skip reason naming how to turn it on."""
    if "nccl" in selection:
        return None
    if launcher_vars(environ) or accelerate_config(environ) is not None:
        return None
    return (
        "opt-in: it starts one torch process per GPU (about 10-30 s); run it with "
        "--unsloth-checks nccl (or unsloth_checks = nccl), or under torchrun / accelerate "
        "launch, where it runs by itself"
    )


WHY = (
    "distributed training (DDP, FSDP, DeepSpeed, vLLM tensor parallel) calls these collectives "
    "every step; a broken transport hangs the job at its first all_reduce or crashes with an "
    "NCCL error"
)


@builtin_check(
    "nccl",
    layer="kernels",
    description="NCCL all_reduce and P2P copy between the GPUs (opt-in)",
    needs_gpu=True,
    probes=("nccl",),
    depends_on=GPU_AND_TORCH,
)
def check_nccl(ctx: CheckContext) -> str:
    """NCCL init, a verified all_reduce and P2P copy between every visible GPU."""
    if ctx.dist("torch") is None:
        raise CheckSkipped("torch is not installed")
    res = ctx.probe("nccl")
    if res.status == "passed":
        peer = res.data.get("peer_copy") or {}
        bad = {k: v for k, v in peer.items() if not str(v).startswith("ok")}
        if bad:
            raise CheckFailed(
                "direct GPU-to-GPU copies lost data: "
                + ", ".join(f"cuda:{k.replace('->', ' -> cuda:')} {v}" for k, v in bad.items()),
                "on a translating IOMMU (common in VMs) a PCIe peer copy can be dropped while "
                "CUDA reports success; NCCL's P2P transport and model-parallel copies then "
                "corrupt tensors silently",
                "export NCCL_P2P_DISABLE=1 for every distributed run on this host, and look for "
                "IOMMU faults: dmesg | grep -i -E 'DMAR|AMD-Vi'",
            )
        return res.message
    if res.status == "skipped":
        raise CheckSkipped(res.message)
    data = res.data
    fixed_by = data.get("fixed_by")
    if fixed_by:
        raise CheckFailed(
            f"NCCL between {data.get('world', '?')} GPUs {data.get('first_failure', res.message)}"
            f"; it passed with {fixed_by}",
            WHY + f"; here the transport that {fixed_by} turns off is broken",
            f"export {fixed_by} before launching training on this machine (in the job's "
            "environment, e.g. `" + str(fixed_by) + " torchrun ...`)",
        )
    if data.get("reason") == "no-nccl":
        raise CheckFailed(
            res.message,
            WHY,
            "install a CUDA build of torch on Linux (torch's NCCL backend is Linux-only); on "
            "Windows train on one GPU or under WSL",
        )
    note = ""
    attempts = data.get("attempts") or []
    if attempts and attempts[0].get("log"):
        note = stderr_summary(str(attempts[0]["log"]))
    elif res.stderr_tail:
        note = stderr_summary(res.stderr_tail)
    found = f"NCCL between {data.get('world', 'the')} GPUs: {res.message}"
    if note and note not in found:
        found += f" (stderr: {note})"
    raise CheckFailed(
        found,
        WHY,
        "run the job with NCCL_DEBUG=INFO to see the transport it picks; check "
        "NCCL_SOCKET_IFNAME names an interface that exists (ip -br link), that /dev/shm is "
        "large enough (unsloth-env::shm) and that the GPUs are healthy (unsloth-env::topology)",
    )
