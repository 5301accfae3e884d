"""check_reward_funcs against real TRL: every defect it reports also breaks a real GRPOTrainer."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

import pytest_unsloth
from cpugrpo import cpu_grpo_config
from pytest_unsloth.grpo import rewards as rewards_mod
from pytest_unsloth.grpo.rewards import assert_reward_funcs, check_reward_funcs, reward_contract

# transformers 5 renames gradient_checkpointing; TRL still sets it (not our concern here).
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip unless every module is installed (the pytest-only env has none of the stack)."""
    missing = [m for m in modules if find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed)")


# --- seed article 002: the five GSM8K reward functions, verbatim ------------------------------


def correctness_reward_func(prompts, completions, answer, **kwargs):
    responses = [c[0]["content"] for c in completions]
    extracted = [
        r.split("<answer>")[-1].split("</answer>")[0].strip() if "<answer>" in r else ""
        for r in responses
    ]
    return [2.0 if e == a else 0.0 for e, a in zip(extracted, answer, strict=False)]


def int_reward_func(completions, **kwargs):
    responses = [c[0]["content"] for c in completions]
    extracted = [
        r.split("<answer>")[-1].split("</answer>")[0].strip() if "<answer>" in r else ""
        for r in responses
    ]
    return [0.5 if e.isdigit() else 0.0 for e in extracted]


def soft_format_reward_func(completions, **kwargs):
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    responses = [c[0]["content"] for c in completions]
    return [0.5 if re.search(pattern, r) else 0.0 for r in responses]


def xmlcount_reward_func(completions, **kwargs):
    responses = [c[0]["content"] for c in completions]
    scores = []
    for r in responses:
        score = 0.0
        if r.count("<reasoning>") == 1:
            score += 0.25
        if r.count("</reasoning>") == 1:
            score += 0.25
        if r.count("<answer>") == 1:
            score += 0.25
        if r.count("</answer>") == 1:
            score += 0.25
        scores.append(score)
    return scores


def strict_format_reward_func(completions, **kwargs):
    pattern = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
    responses = [c[0]["content"] for c in completions]
    return [0.5 if re.match(pattern, r) else 0.0 for r in responses]


ARTICLE_002 = [
    xmlcount_reward_func,
    soft_format_reward_func,
    strict_format_reward_func,
    int_reward_func,
    correctness_reward_func,
]

# --- seed article 000: the nested-list version ("completions[i] holds num_generations") -------


def nested_correctness_reward_func(prompts, completions, answer, **kwargs):
    batch_rewards = []
    for i in range(len(prompts)):
        this_completions = completions[i]
        scores = []
        for comp in this_completions:
            content = comp[0]["content"]
            score = 2.0 if content == answer[i] else 0.0
            scores.append(score)
        batch_rewards.extend(scores)
    return batch_rewards


# --- one defect each ----------------------------------------------------------------------------


def float_reward(completions, **kwargs):
    return 0.5


def short_reward(completions, **kwargs):
    return [1.0] * (len(completions) // 2)


def string_reward(completions, **kwargs):
    return ["good" for _ in completions]


def none_reward(completions, **kwargs):
    return [None for _ in completions]


def no_kwargs_reward(prompts, completions):
    return [1.0 for _ in completions]


def length_reward(completions, **kwargs):
    """A varying reward, so a real step has a non-zero advantage and updates the weights."""
    return [float(len(c[0]["content"])) for c in completions]


async def async_reward(completions, **kwargs):
    await asyncio.sleep(0)
    return [1.0 for _ in completions]


class ObjectReward:
    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float]:
        return [0.0 for _ in completions]


class AsyncObjectReward:
    async def __call__(self, completions: list[Any], **kwargs: Any) -> list[float]:
        return [0.0 for _ in completions]


def plain_only_reward(completions, **kwargs):
    return [float(len(c.strip())) for c in completions]


def empty_crash_reward(completions, **kwargs):
    return [float(c[0]["content"].split()[0] == "4") for c in completions]


def rows(n: int = 4, answer_key: str = "answer") -> list[dict[str, Any]]:
    return [
        {
            "prompt": [
                {"role": "system", "content": "Respond in XML."},
                {"role": "user", "content": f"What is {i} + {i}?"},
            ],
            answer_key: str(2 * i),
        }
        for i in range(n)
    ]


def result(report: rewards_mod.RewardReport, name: str) -> rewards_mod.FuncResult:
    return next(r for r in report.results if r.name == name)


def codes(report: rewards_mod.RewardReport, name: str, severity: str = "error") -> list[str]:
    return [p.code for p in result(report, name).problems if p.severity == severity]


# --- the checker ---------------------------------------------------------------------------------


@needs("trl")
def test_contract_is_read_from_installed_trl() -> None:
    contract = reward_contract()
    assert contract.source.startswith("read from the installed TRL"), contract.source
    assert contract.explicit == ("prompts", "completions", "completion_ids")
    assert {"trainer_state", "log_extra", "log_metric"} <= set(contract.extra)
    assert "environments" in contract.conditional  # only passed with environment_factory
    assert "prompt" in contract.excluded_columns


def test_contract_falls_back_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "grpo_trainer.py"
    broken.write_text("class GRPOTrainer:\n    pass\n")
    monkeypatch.setattr(rewards_mod, "_grpo_trainer_source", lambda: broken)
    contract = reward_contract()
    assert contract.source.startswith("assumed from TRL 1.16.0; could not read the installed TRL")
    assert contract.explicit == ("prompts", "completions", "completion_ids")
    report = check_reward_funcs([int_reward_func])
    assert report.ok
    assert "assumed from TRL" in report.format()


def test_article_002_functions_pass_with_their_dataset() -> None:
    report = check_reward_funcs(ARTICLE_002, rows(), num_generations=6)
    assert report.ok, report.format()
    assert report.shape == "conversational"
    assert report.num_completions == 24
    assert all(r.status == "passed" and r.shapes == ("conversational",) for r in report.results)


def test_article_002_without_dataset_is_conversational_only_info() -> None:
    report = check_reward_funcs(ARTICLE_002)
    assert report.ok, report.format()
    for r in report.results:
        assert r.shapes == ("conversational",)
        assert "shape-only" in [p.code for p in r.problems if p.severity == "info"]
    corr = result(report, "correctness_reward_func")
    assert any(p.code == "needs-column" and "answer" in p.found for p in corr.problems)


def test_nested_article_000_version_is_flagged_with_flat_shape() -> None:
    report = check_reward_funcs([nested_correctness_reward_func], rows(), num_generations=2)
    assert not report.ok
    (problem,) = [p for p in result(report, "nested_correctness_reward_func").problems]
    assert problem.code == "raised"
    assert "KeyError: 0" in problem.found
    assert 'content = comp[0]["content"]' in problem.found  # the user's line
    assert "test_grpo_rewards.py:" in problem.found
    assert "FLAT lists" in problem.why
    assert "completions[i] is one completion, not a group" in problem.why
    assert "completions[i][0]['content']" in problem.fix


@pytest.mark.parametrize(
    ("func", "code", "text"),
    [
        (float_reward, "not-a-list", "returned float 0.5"),
        (short_reward, "wrong-length", "returned 4 rewards for 8 completions"),
        (string_reward, "non-numeric", "rewards[0] = 'good' (str)"),
        (none_reward, "all-none", "None (or NaN) for all 8 completions"),
        (no_kwargs_reward, "missing-kwargs", "also passes completion_ids, trainer_state"),
    ],
)
def test_each_defect_is_caught(func: Any, code: str, text: str) -> None:
    report = check_reward_funcs([func], rows(), num_generations=2)
    assert not report.ok
    problems = [p for p in result(report, func.__name__).problems if p.severity == "error"]
    assert [p.code for p in problems] == [code], report.format()
    assert text in problems[0].found
    assert problems[0].why
    assert problems[0].fix


def test_missing_column_named_with_dataset_columns() -> None:
    report = check_reward_funcs([correctness_reward_func], rows(answer_key="solution"))
    (p,) = [p for p in result(report, "correctness_reward_func").problems if p.severity == "error"]
    assert p.code == "missing-column"
    assert "answer" in p.found
    assert "prompt, solution" in p.found
    assert "missing required keyword argument 'answer'" in p.why


def test_string_reward_func_is_a_hub_id() -> None:
    report = check_reward_funcs([int_reward_func, "correctness_reward_func"])
    failures = report.failures()
    assert [(n, p.code) for n, p in failures] == [("correctness_reward_func", "string-func")]
    p = failures[0][1]
    assert "Hub model id" in p.why
    assert (
        p.fix == "pass the function object without quotes: reward_funcs=[correctness_reward_func]"
    )


def test_hub_looking_string_is_a_warning(tmp_path: Path) -> None:
    report = check_reward_funcs(["OpenAssistant/reward-model"])
    assert report.ok
    assert codes(report, "OpenAssistant/reward-model", "warning") == ["string-func"]


def test_local_reward_model_folder_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    report = check_reward_funcs([str(folder)])
    assert report.ok
    assert report.results[0].status == "model"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not check_reward_funcs([str(empty)]).ok


def test_async_functions_and_callable_objects() -> None:
    funcs = [async_reward, ObjectReward(), AsyncObjectReward(), functools.partial(length_reward)]
    report = check_reward_funcs(funcs, rows())
    assert report.ok, report.format()
    assert [r.name for r in report.results] == [
        "async_reward",
        "ObjectReward",
        "AsyncObjectReward",
        "length_reward",
    ]


def test_async_function_inside_a_running_loop() -> None:
    async def main() -> rewards_mod.RewardReport:
        return check_reward_funcs([async_reward])

    assert asyncio.run(main()).ok


def test_plain_only_function_reported_as_plain_only() -> None:
    report = check_reward_funcs([plain_only_reward])
    r = result(report, "plain_only_reward")
    assert r.ok
    assert r.shapes == ("plain",)
    (p,) = r.problems
    assert p.severity == "info"
    assert p.found.startswith("supports plain data only")
    # With a conversational dataset only that shape counts, so it fails.
    assert not check_reward_funcs([plain_only_reward], rows()).ok


def test_crash_names_the_completion_that_triggers_it() -> None:
    report = check_reward_funcs([empty_crash_reward], rows(), num_generations=4)
    (p,) = result(report, "empty_crash_reward").problems
    assert "IndexError: list index out of range" in p.found
    assert "on completion #3 = [{'role': 'assistant', 'content': ''}]" in p.found


def test_bool_returns_are_accepted() -> None:
    def bool_reward(completions, **kwargs):
        return [True for _ in completions]

    report = check_reward_funcs([bool_reward], rows())
    assert report.ok, report.format()


@needs("numpy", "torch")
def test_tensor_and_array_returns_are_accepted() -> None:
    import numpy as np
    import torch

    def tensor_reward(completions, **kwargs):
        return torch.ones(len(completions))

    def array_reward(completions, **kwargs):
        return np.zeros(len(completions))

    report = check_reward_funcs([tensor_reward, array_reward], rows())
    assert report.ok, report.format()


def test_assert_reward_funcs_raises_with_report() -> None:
    with pytest.raises(AssertionError, match="float_reward: FAILED"):
        assert_reward_funcs([int_reward_func, float_reward], rows())
    assert assert_reward_funcs(ARTICLE_002, rows()).ok


def test_public_lazy_export() -> None:
    assert pytest_unsloth.check_reward_funcs is check_reward_funcs
    assert pytest_unsloth.assert_reward_funcs is assert_reward_funcs
    with pytest.raises(AttributeError):
        pytest_unsloth.no_such_name  # noqa: B018


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_generations"):
        check_reward_funcs([int_reward_func], num_generations=0)
    report = check_reward_funcs([42])
    assert codes(report, "42") == ["not-callable"]
    assert check_reward_funcs([int_reward_func], rows(answer_key="answer")[:0]).problems


# --- the same functions inside a real GRPOTrainer.train() ----------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """One tiny random Llama (float32, CPU) shared by every real-trainer case."""
    import torch
    from transformers import AutoModelForCausalLM

    from pytest_unsloth.models import tiny

    path = tiny.build("llama", seed=0, cache_dir=tmp_path_factory.mktemp("tiny"))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model, tiny.load_tokenizer(path)


def train_once(
    tiny_lm: tuple[Any, Any], tmp_path: Path, funcs: list[Any], data: list[dict[str, Any]]
) -> tuple[Any, bool]:
    """Build a GRPOTrainer and train one step; return (train output, whether weights changed)."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer  # type: ignore[attr-defined]

    model, tokenizer = tiny_lm
    args = cpu_grpo_config(str(tmp_path), max_steps=1)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = trainer.train()
    changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    return out, changed


@pytest.mark.slow
@needs("torch", "transformers", "tokenizers", "trl", "datasets")
class TestSameFailureInRealTrainer:
    """Each reported defect really breaks (or silently neuters) GRPOTrainer.train()."""

    @pytest.mark.parametrize(
        ("func", "code", "error", "message"),
        [
            (nested_correctness_reward_func, "raised", KeyError, "0"),
            (float_reward, "not-a-list", TypeError, "'float' object is not iterable"),
            (short_reward, "wrong-length", ValueError, r"returned 2 rewards, but 4 were expected"),
            (string_reward, "non-numeric", ValueError, "too many dimensions 'str'"),
            (no_kwargs_reward, "missing-kwargs", TypeError, "unexpected keyword argument"),
        ],
    )
    def test_defect_raises_in_train(
        self,
        tiny_lm: tuple[Any, Any],
        tmp_path: Path,
        func: Any,
        code: str,
        error: type[Exception],
        message: str,
    ) -> None:
        data = rows(8)
        assert codes(check_reward_funcs([func], data, num_generations=2), func.__name__) == [code]
        with pytest.raises(error, match=re.escape(message)):
            train_once(tiny_lm, tmp_path, [func], data)

    def test_missing_column_raises_in_train(self, tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
        data = rows(8, answer_key="solution")
        report = check_reward_funcs([correctness_reward_func], data)
        assert codes(report, "correctness_reward_func") == ["missing-column"]
        with pytest.raises(TypeError, match="missing 1 required positional argument: 'answer'"):
            train_once(tiny_lm, tmp_path, [correctness_reward_func], data)

    def test_string_reward_func_fails_at_construction(
        self, tiny_lm: tuple[Any, Any], tmp_path: Path
    ) -> None:
        assert not check_reward_funcs(["correctness_reward_func"]).ok
        with pytest.raises(OSError, match=r"huggingface\.co"):
            train_once(tiny_lm, tmp_path, ["correctness_reward_func"], rows(8))

    def test_all_none_trains_nothing(
        self, tiny_lm: tuple[Any, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        assert codes(check_reward_funcs([none_reward], rows(8)), "none_reward") == ["all-none"]
        # Control: a varying reward does move the weights in one step.
        _, changed = train_once(tiny_lm, tmp_path, [length_reward], rows(8))
        assert changed
        with caplog.at_level(logging.WARNING):
            out, changed = train_once(tiny_lm, tmp_path, [none_reward], rows(8))
        assert not changed
        assert out.training_loss == 0.0
        assert "All reward functions returned None" in caplog.text

    def test_article_002_functions_train(self, tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
        data = rows(8)
        assert check_reward_funcs(ARTICLE_002, data).ok
        out, _ = train_once(tiny_lm, tmp_path, [*ARTICLE_002, async_reward, ObjectReward()], data)
        assert out.global_step == 1


def test_hanging_function_times_out_instead_of_hanging() -> None:
    import threading
    import time

    release = threading.Event()

    def hanging_reward(completions, **kwargs):
        release.wait(30)
        return [0.0 for _ in completions]

    start = time.perf_counter()
    report = check_reward_funcs([hanging_reward, int_reward_func], rows(), timeout=0.2)
    elapsed = time.perf_counter() - start
    release.set()
    assert elapsed < 5
    assert codes(report, "hanging_reward") == ["timeout"]
    assert "did not return within 0.2 s" in result(report, "hanging_reward").problems[0].found
    assert result(report, "int_reward_func").ok


def test_dict_of_columns() -> None:
    data = rows(6)
    report = check_reward_funcs(
        [correctness_reward_func], {k: [r[k] for r in data] for k in data[0]}
    )
    assert report.ok, report.format()
    assert (report.shape, report.num_completions) == ("conversational", 8)
    missing = rows(4, "sol")
    report = check_reward_funcs(
        [correctness_reward_func], {k: [r[k] for r in missing] for k in missing[0]}
    )
    assert codes(report, "correctness_reward_func") == ["missing-column"]


@needs("datasets")
def test_datasets_dataset() -> None:
    from datasets import Dataset

    report = check_reward_funcs([correctness_reward_func], Dataset.from_list(rows(6)))
    assert report.ok, report.format()
    assert (report.shape, report.num_completions) == ("conversational", 8)
    missing = check_reward_funcs([correctness_reward_func], Dataset.from_list(rows(4, "sol")))
    assert codes(missing, "correctness_reward_func") == ["missing-column"]
