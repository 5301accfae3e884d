"""From the plugin's settings to an estimate, and the largest settings that fit a budget."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pytest_unsloth.fit.estimate import MemoryEstimate, estimate_memory
from pytest_unsloth.util.units import GIB, MIB

if TYPE_CHECKING:
    from pytest_unsloth.settings import Settings

# GRPOConfig / TrainingArguments keys the estimate reads from unsloth_grpo_config.
GRPO_KEYS = (
    "num_generations",
    "max_completion_length",
    "max_prompt_length",
    "beta",
    "per_device_train_batch_size",
    "optim",
    "gradient_checkpointing",
    "use_vllm",
    "vllm_gpu_memory_utilization",
)


def find_config(model: str) -> pathlib.Path:
    """config.json of a local folder, a config file, or a Hub id in the local cache (no network)."""
    path = pathlib.Path(model).expanduser()
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return path / "config.json"
    if path.is_dir():
        raise FileNotFoundError(f"{model!r} is a folder without config.json")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(pathlib.Path.home(), ".cache", "huggingface"),
        "hub",
    )
    repo = pathlib.Path(cache) / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = (
        [repo / "snapshots" / ref.read_text().strip()]
        if ref.is_file()
        else sorted((repo / "snapshots").glob("*"))
    )
    for snap in snapshots:
        if (snap / "config.json").is_file():
            return snap / "config.json"
    raise FileNotFoundError(
        f"{model!r} is neither a local folder nor a config.json, and no cached config.json was "
        f"found under {repo}"
    )


def settings_for_estimate(settings: Settings, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Estimate settings from the ini keys the plugin already reads plus unsloth_fit_settings."""
    out: dict[str, Any] = {
        "max_seq_length": settings.max_seq_length,
        "lora_r": settings.lora_r,
        "target_modules": list(settings.lora_target_modules),
        "use_gradient_checkpointing": settings.gradient_checkpointing,
        "fast_inference": settings.fast_inference,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
    }
    if settings.dtype and settings.dtype != "auto":
        out["dtype"] = settings.dtype
    grpo = dict(settings.grpo_config)
    if grpo:
        out["task"] = "grpo"
        for key in GRPO_KEYS:
            if key in grpo:
                out[key] = grpo[key]
    out.update(extra)
    return out


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest integer n in [low, high] with fits(n), fits being monotone; None if none."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def what_fits(
    config: Mapping[str, Any] | str | os.PathLike[str], settings: Mapping[str, Any], budget: int
) -> dict[str, Any]:
    """For each knob, the largest value that brings the estimate within ``budget`` bytes."""
    base = dict(settings)

    def total(**change: Any) -> int:
        return estimate_memory(config, **{**base, **change}).total_bytes

    out: dict[str, Any] = {}
    est = estimate_memory(config, **base)
    s = est.settings
    if s["task"] == "grpo":
        out["num_generations"] = largest_fitting(
            lambda n: total(num_generations=n, per_device_train_batch_size=None) <= budget,
            2,
            max(2, s["num_generations"] * 4),
        )
        out["max_completion_length"] = largest_fitting(
            lambda n: total(max_completion_length=n) <= budget,
            1,
            max(1, s["max_completion_length"] * 4),
        )
    else:
        out["per_device_train_batch_size"] = largest_fitting(
            lambda n: total(per_device_train_batch_size=n) <= budget,
            1,
            max(1, (s["per_device_train_batch_size"] or 1) * 8),
        )
        out["max_seq_length"] = largest_fitting(
            lambda n: total(max_seq_length=n) <= budget, 1, max(1, s["max_seq_length"] * 4)
        )
    if s["fast_inference"]:
        found = largest_fitting(lambda n: total(gpu_memory_utilization=n / 100) <= budget, 1, 99)
        out["gpu_memory_utilization"] = None if found is None else found / 100
    return out


def describe_fits(found: Mapping[str, Any], est: MemoryEstimate) -> str:
    """`num_generations <= 4, max_completion_length <= 700` (only the knobs that can help)."""
    if found and all(value is None for value in found.values()):
        fixed = est.parts["weights"] + est.parts["cuda_context"]
        return (
            f"none (the weights and the CUDA context alone need {gib(fixed)}; no batch size, "
            "length or generation count makes room)"
        )
    bits = []
    for key, value in found.items():
        current = est.settings.get(key)
        if value is None:
            bits.append(f"no {key} fits alone")
        elif current is None or value < current or key == "gpu_memory_utilization":
            bits.append(f"{key} <= {value}")
    return ", ".join(bits) or "none of batch, lengths or generations alone makes it fit"


def gib(n: int | float) -> str:
    """Bytes as `12.3 GiB`, or `27 MiB` below a tenth of a GiB (which `0.0 GiB` would hide)."""
    if abs(n) < GIB / 10:
        return f"{n / MIB:.0f} MiB"
    return f"{n / GIB:.1f} GiB"
