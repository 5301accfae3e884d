"""GRPO checks of ``pytest --unsloth-env``: skip unconfigured, pass a good setup, fail a bad one."""

from __future__ import annotations

import contextlib
import importlib
import json
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.slow]

SELECT = ["--unsloth-env", "-p", "no:cacheprovider", "-k", "reward or budget or grpo or dataset"]

GOOD_REWARDS = """
import re

def format_reward(completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [0.5 if re.search(r"<answer>.*?</answer>", t) else 0.0 for t in texts]

def correctness_reward(prompts, completions, answer, **kwargs):
    return [2.0 if a in c[0]["content"] else 0.0 for c, a in zip(completions, answer)]
"""

BAD_REWARDS = """
def nested(prompts, completions, answer, **kwargs):
    out = []
    for i in range(len(prompts)):
        for comp in completions[i]:
            out.append(2.0 if comp[0]["content"] == answer[i] else 0.0)
    return out

def no_kwargs(prompts, completions):
    return [0.0 for _ in completions]
"""


def write_rows(path: Path, rows: list[dict[str, object]], end: str = "\n") -> None:
    path.write_text("".join(json.dumps(r) + end for r in rows), encoding="utf-8", newline="")


def rows(n: int, words: int = 3) -> list[dict[str, object]]:
    return [
        {
            "prompt": [{"role": "user", "content": "what is " * words + str(i)}],
            "answer": str(i),
        }
        for i in range(n)
    ]


# A tiny model's tokenizer for the length budget, and the installed TRL for the config check.
_MISSING = [m for m in ("torch", "transformers", "tokenizers", "trl") if find_spec(m) is None]
needs_stack = pytest.mark.skipif(
    bool(_MISSING), reason=f"needs {', '.join(_MISSING)} (not installed)"
)


@pytest.fixture(scope="module", autouse=True)
def _preload_stack() -> None:
    """Import the installed stack here first: pytester's in-process runs drop modules first
    imported inside them, and torch's C extension cannot be imported twice in one process."""
    for module in ("torch", "transformers"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    with contextlib.suppress(ImportError):
        from trl import GRPOConfig  # type: ignore[attr-defined]  # noqa: F401


@pytest.fixture
def tiny_folder(pytester: pytest.Pytester) -> Path:
    from pytest_unsloth.models import tiny

    return tiny.build("llama", cache_dir=pytester.path / "models")


def test_unconfigured_checks_skip_naming_the_ini_key(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SELECT, "-rs")
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines_random(
        [
            "*set unsloth_reward_funcs = pkg.module:func*",
            "*set unsloth_dataset (and unsloth_tokenizer)*",
            "*set unsloth_grpo_config (one 'key = value' per line)*",
            "*set unsloth_dataset = path/to/train.jsonl*",
        ]
    )


@needs_stack
def test_good_setup_passes(pytester: pytest.Pytester, tiny_folder: Path) -> None:
    pytester.mkpydir("myproj")
    (pytester.path / "myproj" / "rewards.py").write_text(GOOD_REWARDS)
    write_rows(pytester.path / "train.jsonl", rows(20))
    pytester.makeini(
        f"""
        [pytest]
        unsloth_reward_funcs = myproj.rewards:format_reward myproj.rewards:correctness_reward
        unsloth_dataset = train.jsonl
        unsloth_tokenizer = {tiny_folder}
        unsloth_max_seq_length = 512
        unsloth_grpo_config =
            num_generations = 4
            per_device_train_batch_size = 4
            max_completion_length = 256
        """
    )
    result = pytester.runpytest(*SELECT, "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines_random(
        [
            "*reward-funcs*2 reward function(s) pass on 16 conversational completions*",
            "*length-budget*20 prompts: p50 *, max * tokens + 256 completion <= 512*0 over*",
            "*grpo-config*num_generations 4, per_device_train_batch_size 4*",
            "*dataset*20 lines, 20 valid prompt records, 0 defects*",
        ]
    )


@needs_stack
def test_bad_setup_fails_with_found_why_fix(pytester: pytest.Pytester, tiny_folder: Path) -> None:
    (pytester.path / "bad_rewards.py").write_text(BAD_REWARDS)
    bad_rows = rows(9) + rows(1, words=300)
    write_rows(pytester.path / "train.jsonl", bad_rows)
    with open(pytester.path / "train.jsonl", "a", encoding="utf-8", newline="") as handle:
        handle.write('{"prompt": "x", "answer": "1"}\r\n{not json\n')
    pytester.makeini(
        f"""
        [pytest]
        unsloth_reward_funcs = bad_rewards:nested bad_rewards:no_kwargs bad_rewards:missing
        unsloth_dataset = train.jsonl
        unsloth_tokenizer = {tiny_folder}
        unsloth_max_seq_length = 512
        unsloth_grpo_config =
            num_generations = 6
            per_device_train_batch_size = 1
            gradient_accumulation_steps = 4
            max_prompt_length = 256
            warmup_ratio = 0.1
            max_completion_length = 400
        """
    )
    result = pytester.runpytest(*SELECT)
    result.assert_outcomes(failed=4)
    out = result.stdout.str()
    assert "Traceback" not in out
    result.stdout.fnmatch_lines_random(
        [
            "found: 3 problems:",
            "*1) 'bad_rewards' has no attribute 'missing' (for 'bad_rewards:missing', ini*",
            "*2) bad_rewards:nested: raised KeyError: 0 at *bad_rewards.py:6 in nested:*",
            "*3) bad_rewards:no_kwargs: no_kwargs(prompts, completions) has no **kwargs*",
            "*FLAT lists*",
            "found: 2 problems:",
            "*1) row 0 is conversational but 1 rows are plain, first: row 10",
            "*2) 1 of 11 prompts are longer than 112 tokens *: row 9 (* tokens)*",
            "*1) max_prompt_length = 256 is not a GRPOConfig field in the installed trl*",
            "*2) warmup_ratio = 0.1 is not a GRPOConfig field in the installed transformers*",
            "*3) GRPOConfig(...) raised ValueError: generation_batch_size (4) must be divisible*",
            "found: 2 defect(s) in train.jsonl (prompt schema): 1 crlf, 1 invalid-json",
            "*line 11: CRLF line ending*",
            "*line 12: invalid JSON*",
        ]
    )


def test_module_that_fails_to_import(pytester: pytest.Pytester) -> None:
    (pytester.path / "broken.py").write_text("import no_such_module_xyz\n")
    pytester.makeini(
        """
        [pytest]
        unsloth_reward_funcs = broken:reward
        """
    )
    result = pytester.runpytest(*SELECT, "-k", "reward")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "found: cannot import 'broken' for 'broken:reward' (ini unsloth_reward_funcs in *): "
            "ModuleNotFoundError: No module named 'no_such_module_xyz'",
        ]
    )


def test_missing_dataset_file(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        unsloth_dataset = data/none.jsonl
        """
    )
    result = pytester.runpytest(*SELECT, "-k", "dataset")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["found: ini unsloth_dataset in * = 'data/none.jsonl': no such file*"]
    )


@needs_stack
def test_budget_uses_the_models_context_when_max_seq_length_is_unset(
    pytester: pytest.Pytester, tiny_folder: Path
) -> None:
    write_rows(pytester.path / "train.jsonl", rows(5))
    pytester.makeini(
        f"""
        [pytest]
        unsloth_dataset = train.jsonl
        unsloth_tokenizer = {tiny_folder}
        """
    )
    result = pytester.runpytest(*SELECT, "-k", "budget", "-v")
    result.assert_outcomes(passed=1)
    # TRL's default max_completion_length against the tiny model's 2048 positions, not 256.
    result.stdout.fnmatch_lines(["*5 prompts: p50 *+ 512 completion <= 2048 (max_seq_length)*"])
