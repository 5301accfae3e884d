"""The built-in checks, gathered from the group modules and contributed through the user's hook.

Each built-in check is a function decorated with ``@builtin_check`` in the module of its group;
the kernel checks are made from the kernel-probe list. Adding one is one decorated function.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import pytest

from pytest_unsloth.checks.base import Check
from pytest_unsloth.checks.registry import ATTR

# The run order (and the table's): the Python stack from metadata first, then the GPUs, the
# machine around them, the kernels, the GRPO setup and the fit of one step. Within a layer,
# checks keep the order of GROUPS and of their definitions in the module.
LAYERS = ("stack", "gpu", "machine", "kernels", "grpo", "fit")
GROUPS = ("env", "cuda", "machine", "topology", "nccl", "grpo", "fit")


def _declared(module: Any) -> list[tuple[str, Check]]:
    """(layer, check) for each ``@builtin_check`` function of ``module``, in definition order."""
    found = []
    for obj in vars(module).values():
        spec = getattr(obj, ATTR, None) if callable(obj) else None
        if isinstance(spec, dict) and spec.get("builtin"):
            fields = {k: v for k, v in spec.items() if k != "layer"}
            found.append((spec["layer"], Check(func=obj, **fields)))
    return found


def _kernel_checks() -> list[tuple[str, Check]]:
    """One check per kernel probe (nccl has its own opt-in check)."""
    from pytest_unsloth.checks.cuda import GPU_AND_TORCH
    from pytest_unsloth.checks.kernels import make_kernel_check
    from pytest_unsloth.probes.table import KERNEL_PROBES

    return [
        (
            "kernels",
            Check(
                name,
                make_kernel_check(name),
                f"{name} kernel loads and runs",
                needs_gpu=True,
                probes=(name,),
                depends_on=GPU_AND_TORCH,
                builtin=True,
            ),
        )
        for name in KERNEL_PROBES
        if name != "nccl"
    ]


def builtin_checks() -> list[Check]:
    """Every built-in check in run order."""
    declared = _kernel_checks()
    for group in GROUPS:
        declared += _declared(importlib.import_module(f"pytest_unsloth.checks.{group}"))
    return [chk for _, chk in sorted(declared, key=lambda d: LAYERS.index(d[0]))]


class BuiltinChecks:
    """Plugin object contributing the built-in checks through ``pytest_unsloth_checks``."""

    @pytest.hookimpl
    def pytest_unsloth_checks(self, config: pytest.Config) -> list[Check]:
        """Contribute the built-in checks (costly opt-in ones disabled unless asked for)."""
        from pytest_unsloth.checks.nccl import opt_in_reason
        from pytest_unsloth.settings import get_settings

        reason = opt_in_reason(get_settings(config).checks)
        return [
            dataclasses.replace(c, disabled=reason) if c.name == "nccl" and reason else c
            for c in builtin_checks()
        ]
