"""``unsloth-env::fit``: will one training step of the configured setup fit the GPU?

Reads ``unsloth_model`` (config.json only: a folder, a file or a cached Hub id), the LoRA, length
and GRPO settings the plugin already reads and ``unsloth_fit_settings``, estimates the peak
(``pytest_unsloth.fit``, pure Python) and compares it with each visible GPU's free memory, or with
``unsloth_fit_target`` when no GPU is visible. Runs in the pytest process: no torch import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.registry import builtin_check
from pytest_unsloth.util.units import GIB

if TYPE_CHECKING:
    from pytest_unsloth.fit import MemoryEstimate

__all__ = ["fit_check"]


def _breakdown(est: Any) -> str:
    from pytest_unsloth.fit.plan import gib

    return ", ".join(f"{k} {gib(v)}" for k, v in est.parts.items() if v > 0)


@builtin_check(
    "fit",
    layer="fit",
    description="one training step fits free GPU memory (or the fit target)",
)
def fit_check(ctx: CheckContext) -> str | None:
    """Estimate the step's peak memory and compare it with free GPU memory or the fit target."""
    from pytest_unsloth.fit.plan import gib, settings_for_estimate

    st = ctx.settings
    config_path = _model_config(ctx)
    settings = settings_for_estimate(st, st.fit_settings)
    nv = ctx.nvml
    gpus = [d for d in nv.visible] if nv.available else []
    if gpus:
        settings.setdefault("gpu_total_memory", min(d.free_bytes for d in gpus))
    elif st.fit_target_gib is not None:
        settings.setdefault("gpu_total_memory", int(st.fit_target_gib * GIB))
    est = _estimate(config_path, settings)
    total = est.total_bytes
    if est.vllm is not None and not est.vllm.fits_one_sequence:
        raise _vllm_too_small(est.vllm)
    targets = _targets(ctx, gpus)
    if not targets:
        figure = f"~{gib(total)} ({est.model_type}: {est.summary(3)})"
        return f"{figure}; no GPU and no unsloth_fit_target to compare with"
    short = [(where, free) for where, free in targets if free < total]
    if not short:
        where, free = min(targets, key=lambda t: t[1])
        fits = f"~{gib(total)} fits {where} ({gib(free)} free)"
        close = _close_call(total, free, est.settings["stack"])
        return f"{fits}{close}; {est.model_type}: {est.summary(3)}"
    where, free = min(short, key=lambda t: t[1])
    has = f"more than {where}" if not gpus else f"{where} has {gib(free)} free"
    raise _does_not_fit(est, has, config_path, settings, free)


# The estimator's measured band (README, "Will it fit?"). Inside it a step can need more than
# estimated: capped at their estimates, the H200 points whose estimates were 2.5-4.5 % under
# their measured need ran out of memory; with 10 % more, 10 of 11 completed under PyTorch's default
# allocator (the 11th needs expandable segments).
CLOSE_CALL = 0.10
ALLOC_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _close_call(total: int, free: int, stack: str) -> str:
    """A warning when the estimate is within the estimator's band of the free memory."""
    import os

    from pytest_unsloth.fit.plan import gib

    if total <= free * (1 - CLOSE_CALL):
        return ""
    hint = ""
    expandable = any("expandable_segments:true" in os.environ.get(k, "").lower() for k in ALLOC_ENV)
    if stack != "unsloth" and not expandable:  # unsloth_zoo turns expandable segments on itself
        hint = (
            "; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps the need nearest the "
            "estimate (the default allocator also holds outgrown blocks)"
        )
    return (
        f"; close call: {gib(free - total)} of headroom is inside the estimate's "
        f"{CLOSE_CALL:.0%} band, so the step may still run out of memory; leave more room{hint}"
    )


def _model_config(ctx: CheckContext) -> Path:
    """The config.json of unsloth_model; a skip when none is configured, a failure when absent."""
    from pytest_unsloth.fit.plan import find_config

    st = ctx.settings
    if not st.model:
        raise CheckSkipped("no model configured: set unsloth_model (a folder or cached Hub id)")
    try:
        return find_config(st.model)
    except (FileNotFoundError, OSError) as exc:
        raise CheckFailed(
            found=f"no config.json for unsloth_model = {st.model!r} ({st.source('model')}): {exc}",
            why="the estimate reads the model's shape from its config.json",
            fix="point unsloth_model at a folder with config.json, or download the model first",
        ) from None


def _estimate(config_path: Path, settings: dict[str, Any]) -> MemoryEstimate:
    """The estimate, or a failure naming the setting that does not describe a trainable LM."""
    from pytest_unsloth.fit.estimate import estimate_memory

    try:
        return estimate_memory(config_path, **settings)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckFailed(
            found=f"cannot estimate {config_path}: {exc}",
            why="the settings or the config.json do not describe a trainable causal LM",
            fix="fix the setting named above (unsloth_fit_settings / unsloth_grpo_config)",
        ) from None


def _vllm_too_small(b: Any) -> CheckFailed:
    """vLLM's KV cache cannot hold one sequence."""
    from pytest_unsloth.fit.plan import gib

    return CheckFailed(
        found=f"vLLM's KV cache ({gib(b.kv_cache_bytes)} of the {gib(b.requested_bytes)} "
        f"reserved) holds ~{b.kv_tokens} tokens, less than one sequence of {b.needed_tokens} "
        f"tokens ({gib(b.one_sequence_bytes)})",
        why="vLLM refuses to start, or unsloth shrinks max_seq_length and prompts get cut",
        fix="raise gpu_memory_utilization, shorten prompt + completion, or use 4-bit weights",
    )


def _targets(ctx: CheckContext, gpus: list[Any]) -> list[tuple[str, int]]:
    """(where, free bytes) to compare with: each visible GPU, else the fit target, else none."""

    st = ctx.settings
    if gpus:
        return [(f"cuda:{d.cuda_index} ({d.name})", d.free_bytes) for d in gpus]
    if st.fit_target_gib is not None:
        where = f"the fit target {st.fit_target_gib:g} GiB ({st.source('fit_target_gib')})"
        return [(where, int(st.fit_target_gib * GIB))]
    return []


def _does_not_fit(
    est: MemoryEstimate, has: str, config_path: Path, settings: dict[str, Any], free: int
) -> CheckFailed:
    """The step needs more than ``free``: the parts, and the settings that would fit now."""
    from pytest_unsloth.fit.plan import describe_fits, gib, what_fits

    largest = what_fits(config_path, settings, free)
    s = est.settings
    other = [
        hint
        for hint, done in (
            ("4-bit weights", s["load_in_4bit"]),
            ("gradient checkpointing", s["use_gradient_checkpointing"] != "false"),
            ("8-bit AdamW", "8bit" in str(s["optim"])),
        )
        if not done
    ] + ["a smaller model"]
    return CheckFailed(
        found=f"one training step needs ~{gib(est.total_bytes)}, {has}; by part: "
        f"{_breakdown(est)}; biggest: {est.biggest_part}",
        why="training stops with CUDA out of memory at the first step",
        fix=f"settings that fit now: {describe_fits(largest, est)} (or {', '.join(other)})",
    )
