"""The built-in checks, contributed through the same hook a conftest or plugin uses."""

from __future__ import annotations

import pytest

from pytest_unsloth.checks.base import Check, CheckContext, CheckFailed, CheckSkipped

__all__ = ["Check", "CheckContext", "CheckFailed", "CheckSkipped", "builtin_checks"]


# Root causes (owned by the cuda check) that make the GPU checks below meaningless.
GPU = ("gpu-visible",)
GPU_AND_TORCH = ("gpu-visible", "torch-gpu")


def builtin_checks() -> list[Check]:
    """Every built-in check in run order."""
    from pytest_unsloth.checks import (
        cuda,
        env,
        fit,
        grpo,
        kernels,
        machine,
        nccl,
        topology,
    )
    from pytest_unsloth.probe import KERNEL_PROBES

    checks = [
        Check("python", env.check_python, "Python against Requires-Python of the stack"),
        Check("packages", env.check_packages, "installed stack, required packages, shadowing"),
        Check("pins", env.check_pins, "declared Requires-Dist between stack packages hold"),
        Check("known-bad", env.check_known_bad, "combinations known to break at run time"),
        Check("user-pins", env.check_user_pins, "the project's unsloth_pins"),
        Check("windows", env.check_windows, "versions inside windows kept in installed source"),
        Check(
            "cuda",
            cuda.check_cuda,
            "NVML sees GPUs and torch can use them",
            True,
            probes=("torch",),
        ),
        Check(
            "driver",
            cuda.check_driver,
            "driver CUDA version runs torch's CUDA runtime",
            True,
            depends_on=GPU_AND_TORCH,
        ),
        Check(
            "arch",
            cuda.check_arch,
            "every extension has code for each GPU / unsloth_target_arch",
            True,
            probes=("torch",),
            depends_on=GPU_AND_TORCH,
        ),
        Check("bf16", cuda.check_bf16, "bf16 support of each GPU", True, depends_on=GPU),
        Check(
            "vram",
            cuda.check_vram,
            "free GPU memory against the configured minimum",
            True,
            depends_on=GPU,
        ),
        Check(
            "launcher",
            machine.check_launcher,
            "several GPUs only under a launcher; mixed models in PCI order",
            True,
        ),
        Check(
            "topology",
            topology.check_topology,
            "GPU links, P2P, compute mode, ECC, clocks, MIG (NVML)",
            True,
        ),
        Check("shm", machine.check_shm, "/dev/shm size inside a container"),
        Check("disk", machine.check_disk, "free disk for the Hub cache and the outputs"),
        Check("compiler", machine.check_compiler, "C compiler, Python.h, libcuda, nvcc for JIT"),
        Check("platform", machine.check_platform, "WSL and Windows specific causes"),
    ]
    checks += [
        Check(
            name,
            kernels.make_kernel_check(name),
            f"{name} kernel loads and runs",
            True,
            probes=(name,),
            depends_on=GPU_AND_TORCH,
        )
        for name in KERNEL_PROBES
        if name != "nccl"
    ]
    checks.append(
        Check(
            "nccl",
            nccl.check_nccl,
            "NCCL all_reduce and P2P copy between the GPUs (opt-in)",
            True,
            probes=("nccl",),
            depends_on=GPU_AND_TORCH,
        )
    )
    checks += [
        Check(
            "reward-funcs",
            grpo.reward_funcs_check,
            "reward functions follow TRL's calling contract",
        ),
        Check(
            "length-budget",
            grpo.length_budget_check,
            "prompt + completion fit the sequence budget",
        ),
        Check("grpo-config", grpo.grpo_config_check, "GRPO settings build a valid GRPOConfig"),
        Check("dataset", grpo.dataset_check, "dataset file is well-formed"),
        Check("fit", fit.fit_check, "one training step fits free GPU memory (or the fit target)"),
    ]
    return checks


class BuiltinChecks:
    """Plugin object contributing the built-in checks through ``pytest_unsloth_checks``."""

    @pytest.hookimpl
    def pytest_unsloth_checks(self, config: pytest.Config) -> list[Check]:
        """Contribute the built-in checks (costly opt-in ones disabled unless asked for)."""
        import dataclasses

        from pytest_unsloth.checks.nccl import opt_in_reason
        from pytest_unsloth.settings import get_settings

        reason = opt_in_reason(get_settings(config).checks)
        return [
            dataclasses.replace(c, disabled=reason) if c.name == "nccl" and reason else c
            for c in builtin_checks()
        ]
