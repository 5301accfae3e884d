"""The GRPOConfig of the tests that really train a tiny model with TRL on the CPU."""

from __future__ import annotations

from typing import Any


def cpu_grpo_config(output_dir: str, max_steps: int) -> Any:
    """Two generations of six tokens per prompt, four rows per step, fp32 on the CPU, no saving."""
    from trl import GRPOConfig  # type: ignore[attr-defined]

    return GRPOConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
