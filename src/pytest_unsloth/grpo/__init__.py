"""GRPO setup checks: reward-function contract, length budget, GRPOConfig, JSONL datasets.

The plugin imports ``pytest_unsloth.grpo.fixture`` on every pytest run, which imports this
package; so the helpers load lazily on first attribute access, and their own heavy imports
(TRL, transformers, torch) happen inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_unsloth import _lazy_attributes

if TYPE_CHECKING:
    from pytest_unsloth.grpo.budget import BudgetReport, check_length_budget
    from pytest_unsloth.grpo.config import ConfigReport, check_grpo_config
    from pytest_unsloth.grpo.jsonl import JsonlReport, LineProblem, check_jsonl
    from pytest_unsloth.grpo.problems import Problem
    from pytest_unsloth.grpo.rewards import (
        FuncResult,
        RewardContract,
        RewardReport,
        assert_reward_funcs,
        check_reward_funcs,
        reward_contract,
    )

# public name -> submodule that defines it
EXPORTS: dict[str, str] = {
    "BudgetReport": "budget",
    "check_length_budget": "budget",
    "ConfigReport": "config",
    "check_grpo_config": "config",
    "JsonlReport": "jsonl",
    "LineProblem": "jsonl",
    "check_jsonl": "jsonl",
    "Problem": "problems",
    "FuncResult": "rewards",
    "RewardContract": "rewards",
    "RewardReport": "rewards",
    "assert_reward_funcs": "rewards",
    "check_reward_funcs": "rewards",
    "reward_contract": "rewards",
}

__all__ = [
    "BudgetReport",
    "ConfigReport",
    "FuncResult",
    "JsonlReport",
    "LineProblem",
    "Problem",
    "RewardContract",
    "RewardReport",
    "assert_reward_funcs",
    "check_grpo_config",
    "check_jsonl",
    "check_length_budget",
    "check_reward_funcs",
    "reward_contract",
]


__getattr__ = _lazy_attributes(__name__, {k: f"{__name__}.{v}" for k, v in EXPORTS.items()})


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
