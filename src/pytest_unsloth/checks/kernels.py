"""Checks that a kernel really loads and runs, one probe subprocess each."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.install import install_keeping_torch
from pytest_unsloth.probes.runner import PROBE_DISTS, stderr_summary

if TYPE_CHECKING:
    from pytest_unsloth.shadow import Shadow

# Why a broken kernel matters, and the usual repair, per probe.
WHY: dict[str, tuple[str, str]] = {
    "bitsandbytes": (
        "load_in_4bit and QLoRA use these kernels; without them loading fails or silently falls "
        "back to 16-bit and runs out of memory",
        "pip install --force-reinstall --no-deps 'bitsandbytes>=0.46.1' (its wheel must match "
        "torch's CUDA major version)",
    ),
    "triton": (
        "unsloth's fused kernels and torch.compile are Triton kernels; a broken Triton fails at "
        "the first training step",
        "reinstall the triton release your torch declares (pip install --force-reinstall torch "
        "pulls the matching triton); make sure a C compiler is on PATH",
    ),
    "flash-attn": (
        "attn_implementation='flash_attention_2' calls these kernels; an ABI mismatch crashes "
        "at the first forward",
        "pip install --force-reinstall --no-build-isolation flash-attn (built against the "
        "installed torch), or uninstall it to fall back to sdpa",
    ),
    "xformers": (
        "unsloth and vLLM use xformers attention when it is installed; a build for another torch "
        "fails or falls back silently",
        "pip install --force-reinstall xformers matching the installed torch (see its "
        "Requires-Dist), or uninstall it",
    ),
    "unsloth": (
        "a training script's first line `import unsloth` fails the same way, after the job "
        "has already been scheduled",
        "reinstall it without touching torch: pip install --force-reinstall --no-deps unsloth "
        "unsloth_zoo, then fix what the pins check reports",
    ),
    "vllm": (
        "fast_inference=True / use_vllm=True start vLLM; a vLLM built for another torch fails "
        "at model load after minutes",
        "pip install the vllm release built for the installed torch (vllm's Requires-Dist names "
        "it), or set fast_inference=False",
    ),
}


def _stray(ctx: CheckContext, dist_name: str) -> Shadow | None:
    from pytest_unsloth.shadow import find_shadow

    dist = ctx.dist(dist_name)
    return find_shadow(dist) if dist is not None else None


def make_kernel_check(name: str) -> Callable[[CheckContext], str]:
    """A check function reading the probe NAME."""

    def kernel_check(ctx: CheckContext) -> str:
        dist = PROBE_DISTS[name]
        required = any(r.lower().replace("_", "-") == dist for r in ctx.settings.require)
        if ctx.dist(dist) is None and not required:
            raise CheckSkipped(f"{dist} is not installed (not required)")
        res = ctx.probe(name)
        if res.status == "passed":
            return res.message
        if res.status == "skipped" and not (required and ctx.dist(dist) is None):
            raise CheckSkipped(res.message)
        why, fix = WHY[name]
        if ctx.dist(dist) is None:
            # Required but missing: the fix is the install line, pinned to the installed torch.
            raise CheckFailed(
                f"{dist} is not installed ({ctx.settings.source('require')} requires it)",
                why,
                install_keeping_torch(ctx, [dist]) + " (naming the installed torch keeps pip "
                "from replacing it with another build)",
            )
        found = f"{name} probe {res.message}" if res.status == "failed" else res.message
        stray = _stray(ctx, dist) or _stray(ctx, "torch")
        if stray is not None and res.status == "failed":
            raise CheckFailed(
                f"{found}: {stray.describe()}",
                "a file or folder named like the package earlier on the import path replaces it",
                stray.fix(),
            )
        note = stderr_summary(res.stderr_tail)
        if note and res.status == "failed" and note not in found:
            found += f" (stderr: {note})"
        raise CheckFailed(found, why, fix)

    kernel_check.__name__ = f"check_{name.replace('-', '_')}"
    kernel_check.__doc__ = f"The {name} kernel loads and runs in a clean interpreter."
    return kernel_check
