"""check_length_budget on a real fast tokenizer with a chat template (the tiny offline one)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pytest_unsloth.grpo.budget import check_length_budget, prompt_of

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # The tiny model is built with torch and its tokenizer trained with tokenizers.
    for module in ("torch", "transformers", "tokenizers"):
        pytest.importorskip(module)
    from pytest_unsloth.models import tiny

    return tiny.load_tokenizer(tiny.build("llama", cache_dir=tmp_path_factory.mktemp("tiny")))


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def templated_length(tokenizer: Any, prompt: Any) -> int:
    """One prompt at a time, independently of the batched code under test."""
    ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return len(ids)


def test_lengths_match_trl_tokenize_prompts(tokenizer: Any) -> None:
    pytest.importorskip("trl")
    from trl import GRPOTrainer  # type: ignore[attr-defined]

    prompts = [chat("What is 2 + 2?"), chat("word " * 40), chat("答案是 4")]
    # GRPOTrainer._tokenize_prompts on a stand-in self: the exact code TRL runs at each step.
    fake_self = SimpleNamespace(
        processing_class=tokenizer,
        _is_vlm=False,
        environment_factories=None,
        tools=[],
        chat_template=None,
        chat_template_kwargs={},
    )
    trl_ids, _, _ = GRPOTrainer._tokenize_prompts(fake_self, prompts)  # type: ignore[arg-type]
    report = check_length_budget(
        tokenizer, [{"prompt": p} for p in prompts], max_seq_length=10_000, max_completion_length=1
    )
    assert report.ok
    assert report.max == max(len(ids) for ids in trl_ids)
    assert sorted(len(ids) for ids in trl_ids)[1] == report.p50


def test_overflowing_rows_are_named_with_percentiles(tokenizer: Any) -> None:
    texts = ["short one"] * 18 + ["word " * 200, "number 1234 " * 120]
    rows = [{"prompt": chat(t), "answer": "1"} for t in texts]
    lengths = [templated_length(tokenizer, r["prompt"]) for r in rows]
    short, long1, long2 = lengths[0], lengths[18], lengths[19]
    limit = short + 64
    report = check_length_budget(tokenizer, rows, max_seq_length=limit, max_completion_length=32)
    assert not report.ok
    assert [i for i, _ in report.overflow] == [18, 19]
    assert report.overflow == ((18, long1), (19, long2))
    assert (report.p50, report.max) == (short, max(long1, long2))
    (p,) = report.problems
    assert p.code == "overflow"
    assert f"row 18 ({long1} tokens)" in p.found
    assert f"row 19 ({long2} tokens)" in p.found
    assert f"2 of 20 prompts are longer than {limit - 32} tokens" in p.found
    assert f"max {max(long1, long2)}" in p.found
    assert "does not truncate prompts" in p.why
    assert f"raise max_seq_length to {max(long1, long2) + 32}" in p.fix
    assert "2 over" in report.summary()


def test_everything_fits(tokenizer: Any) -> None:
    rows = [{"prompt": chat(f"What is {i} + {i}?")} for i in range(50)]
    report = check_length_budget(tokenizer, rows, max_seq_length=256, max_completion_length=128)
    assert report.ok
    assert report.count == 50
    assert not report.overflow
    assert report.p95 <= report.max <= 256 - 128


def test_plain_prompts_tokenized_without_template(tokenizer: Any) -> None:
    rows = [{"prompt": "hello world"}]
    report = check_length_budget(tokenizer, rows, max_seq_length=64, max_completion_length=8)
    assert report.max == len(tokenizer(text=["hello world"])["input_ids"][0])


def test_max_prompt_length_in_config_is_called_out(tokenizer: Any) -> None:
    config = {"max_prompt_length": 256, "max_completion_length": 16}
    report = check_length_budget(
        tokenizer, [{"prompt": chat("hi")}], max_seq_length=512, config=config
    )
    (p,) = report.problems
    assert p.code == "max-prompt-length"
    assert "GRPOConfig has no max_prompt_length" in p.why
    assert report.max_completion_length == 16  # read from the config


def test_default_completion_length_from_installed_trl(tokenizer: Any) -> None:
    pytest.importorskip("trl")
    from trl import GRPOConfig  # type: ignore[attr-defined]

    report = check_length_budget(tokenizer, [{"prompt": chat("hi")}], max_seq_length=4096)
    assert (
        report.max_completion_length
        == GRPOConfig.__dataclass_fields__["max_completion_length"].default
    )


def test_vllm_limit_is_used_when_lower(tokenizer: Any) -> None:
    config = {"use_vllm": True, "vllm_max_model_length": 40, "max_completion_length": 30}
    report = check_length_budget(
        tokenizer, [{"prompt": chat("word " * 30)}], max_seq_length=4096, config=config
    )
    assert (report.limit, report.limit_name) == (40, "vllm_max_model_length")
    assert not report.ok


def test_completion_longer_than_limit(tokenizer: Any) -> None:
    report = check_length_budget(
        tokenizer, [{"prompt": chat("hi")}], max_seq_length=256, max_completion_length=512
    )
    assert [p.code for p in report.problems] == ["completion-too-long"]


def test_no_chat_template_for_conversational_prompts(tokenizer: Any) -> None:
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    report = check_length_budget(
        bare, [{"prompt": chat("hi")}], max_seq_length=256, max_completion_length=8
    )
    assert [p.code for p in report.problems] == ["no-chat-template"]


def test_rows_without_a_prompt(tokenizer: Any) -> None:
    report = check_length_budget(
        tokenizer, [{"question": "hi"}], max_seq_length=256, max_completion_length=8
    )
    assert [p.code for p in report.problems] == ["no-prompt"]
    assert "question" in report.problems[0].found


def test_prompt_of_each_schema() -> None:
    assert prompt_of({"prompt": "x"}) == "x"
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert prompt_of({"messages": messages}) == messages[:1]
    assert prompt_of({"instruction": "do", "input": "this", "output": "ok"}) == [
        {"role": "user", "content": "do\n\nthis"}
    ]
    with pytest.raises(TypeError):
        prompt_of(3)


def test_mixed_and_bad_prompts_are_reported_not_crashed(tokenizer: Any) -> None:
    rows = [{"prompt": chat("hi")}, {"prompt": "plain text"}, {"prompt": 42}]
    report = check_length_budget(tokenizer, rows, max_seq_length=256, max_completion_length=8)
    assert [p.code for p in report.problems] == ["bad-prompt", "mixed-prompts"]
    assert "row 2 = 42" in report.problems[0].found
    assert "row 0 is conversational but 1 rows are plain, first: row 1" in report.problems[1].found
    assert report.count == 2  # the two measurable prompts were still measured


@pytest.mark.parametrize("fast_path_agrees", [True, False])
def test_many_prompts_measured_exactly(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch, fast_path_agrees: bool
) -> None:
    from pytest_unsloth.grpo import budget

    if not fast_path_agrees:
        # A tokenizer whose raw Rust encoding differs from TRL's call must not be trusted.
        monkeypatch.setattr(budget, "_fast_lengths", lambda *a: [1] * _count(a[1]))
    texts: list[Any] = [chat("word " * (i % 37) + str(i)) for i in range(120)]
    texts += [f"plain {i} " * (i % 11) for i in range(60)]
    rows = [{"prompt": t} for t in texts]
    expected = [templated_length(tokenizer, t) for t in texts[:120]]
    expected += [len(tokenizer(text=[t])["input_ids"][0]) for t in texts[120:]]
    budget_limit = sorted(expected)[150]
    report = check_length_budget(
        tokenizer, rows, max_seq_length=budget_limit + 8, max_completion_length=8
    )
    assert report.overflow == tuple((i, n) for i, n in enumerate(expected) if n > budget_limit)
    assert report.max == max(expected)


def _count(prompts: list[Any]) -> int:
    return len(prompts)
