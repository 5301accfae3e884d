"""Will it fit? Peak GPU memory of LoRA/QLoRA SFT and GRPO steps from a model's config.json."""

from __future__ import annotations

from pytest_unsloth.fit.estimate import (
    COEFFICIENTS,
    DEFAULTS,
    Coefficients,
    MemoryEstimate,
    accelerate_style,
    estimate_memory,
)

__all__ = [
    "COEFFICIENTS",
    "DEFAULTS",
    "Coefficients",
    "MemoryEstimate",
    "accelerate_style",
    "estimate_memory",
]
