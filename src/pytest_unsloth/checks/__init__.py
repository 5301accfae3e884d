"""The built-in checks, contributed through the same hook a conftest or plugin uses."""

from __future__ import annotations

import pytest

from pytest_unsloth.checks.base import Check, CheckContext, CheckFailed, CheckSkipped

__all__ = ["Check", "CheckContext", "CheckFailed", "CheckSkipped", "builtin_checks"]


def builtin_checks() -> list[Check]:
    """Every built-in check in run order."""
    from pytest_unsloth.checks import cuda, env, fit, grpo_checks, kernels
    from pytest_unsloth.probe import KERNEL_PROBES

    checks = [
        Check("python", env.check_python, "Python against Requires-Python of the stack"),
        Check("packages", env.check_packages, "installed stack, required packages, shadowing"),
        Check("pins", env.check_pins, "declared Requires-Dist between stack packages hold"),
        Check("known-bad", env.check_known_bad, "combinations known to break at run time"),
        Check("user-pins", env.check_user_pins, "the project's unsloth_pins"),
        Check(
            "cuda",
            cuda.check_cuda,
            "NVML sees GPUs and torch can use them",
            True,
            probes=("torch",),
        ),
        Check("driver", cuda.check_driver, "driver CUDA version runs torch's CUDA runtime", True),
        Check(
            "arch",
            cuda.check_arch,
            "GPU compute capability in torch's arch list",
            True,
            probes=("torch",),
        ),
        Check("bf16", cuda.check_bf16, "bf16 support of each GPU", True),
        Check("vram", cuda.check_vram, "free GPU memory against the configured minimum", True),
    ]
    checks += [
        Check(
            name,
            kernels.make_kernel_check(name),
            f"{name} kernel loads and runs",
            True,
            probes=(name,),
        )
        for name in KERNEL_PROBES
    ]
    checks += [
        Check(
            "reward-funcs",
            grpo_checks.reward_funcs_check,
            "reward functions follow TRL's calling contract",
        ),
        Check(
            "length-budget",
            grpo_checks.length_budget_check,
            "prompt + completion fit the sequence budget",
        ),
        Check(
            "grpo-config", grpo_checks.grpo_config_check, "GRPO settings build a valid GRPOConfig"
        ),
        Check("dataset", grpo_checks.dataset_check, "dataset file is well-formed"),
        Check("fit", fit.fit_check, "one training step fits free GPU memory (or the fit target)"),
    ]
    return checks


class BuiltinChecks:
    """Plugin object contributing the built-in checks through ``pytest_unsloth_checks``."""

    @pytest.hookimpl
    def pytest_unsloth_checks(self, config: pytest.Config) -> list[Check]:
        """Contribute the built-in checks."""
        return builtin_checks()
