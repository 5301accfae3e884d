"""pytest-unsloth: check an Unsloth / TRL fine-tuning environment before it burns GPU hours."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pytest_unsloth.checks.base import Check, CheckContext, CheckFailed, CheckSkipped
    from pytest_unsloth.checks.registry import check
    from pytest_unsloth.fit import MemoryEstimate, estimate_memory
    from pytest_unsloth.grpo import (
        assert_reward_funcs,
        check_grpo_config,
        check_jsonl,
        check_length_budget,
        check_reward_funcs,
    )

# Public helpers, imported on first use so `import pytest_unsloth` (done by every pytest run
# through the plugin) stays as light as the standard library.
_LAZY: dict[str, str] = {
    "Check": "pytest_unsloth.checks.base",
    "CheckContext": "pytest_unsloth.checks.base",
    "CheckFailed": "pytest_unsloth.checks.base",
    "CheckSkipped": "pytest_unsloth.checks.base",
    "check": "pytest_unsloth.checks.registry",
    "assert_reward_funcs": "pytest_unsloth.grpo",
    "check_grpo_config": "pytest_unsloth.grpo",
    "check_jsonl": "pytest_unsloth.grpo",
    "check_length_budget": "pytest_unsloth.grpo",
    "check_reward_funcs": "pytest_unsloth.grpo",
    "MemoryEstimate": "pytest_unsloth.fit",
    "estimate_memory": "pytest_unsloth.fit",
}

__all__ = [
    "Check",
    "CheckContext",
    "CheckFailed",
    "CheckSkipped",
    "MemoryEstimate",
    "__version__",
    "assert_reward_funcs",
    "check",
    "check_grpo_config",
    "check_jsonl",
    "check_length_budget",
    "check_reward_funcs",
    "estimate_memory",
]


def _lazy_attributes(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing the module ``where[name]`` on first access.

    Defined here, not in a utility module, so ``import pytest_unsloth`` reads one file;
    ``pytest_unsloth.grpo`` uses it too. Nothing is cached in the package's globals: the
    defining module in ``sys.modules`` stays the single source of each class.
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__


# Public helpers, imported on first use (see _LAZY).
__getattr__ = _lazy_attributes(__name__, _LAZY)
