"""Install lines that never replace the user's torch."""

from __future__ import annotations

import shlex

from pytest_unsloth.checks.base import CheckContext

# What pip needs to install each missing probe's package well (beside the torch pin).
INSTALL_ARGS: dict[str, tuple[str, ...]] = {
    "unsloth": ("unsloth", "unsloth_zoo"),
    "flash-attn": ("--no-build-isolation", "flash-attn"),
    "bitsandbytes": ("bitsandbytes>=0.46.1",),
}


def install_keeping_torch(ctx: CheckContext, dists: list[str], *, as_named: bool = False) -> str:
    """``pip install DISTS 'torch==<installed>'``: pip installs them or fails, torch stays.

    unsloth, vllm, xformers and friends declare torch; a plain ``pip install`` of them replaces a
    working torch (a CPU build with a multi-GB CUDA one, or another CUDA version). Naming the
    installed torch in the same command makes pip pick releases built for it, or stop.
    ``as_named`` installs exactly the names given (the user's own ``unsloth_require`` list).
    """
    args: list[str] = []
    for dist in dists:
        args += (dist,) if as_named else INSTALL_ARGS.get(dist, (dist,))
    torch = ctx.dist("torch")
    if torch is not None and torch.version and "torch" not in dists:
        args.append(f"torch=={torch.version}")
    return "pip install " + " ".join(shlex.quote(a) for a in args)
