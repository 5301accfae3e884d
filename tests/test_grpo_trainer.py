"""The grpo_trainer factory fixture: checks first, then a real GRPOTrainer that trains on CPU."""

from __future__ import annotations

import sys
from importlib.util import find_spec
from typing import Any

import pytest

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.slow]


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip unless every module is installed (the pytest-only env has none of the stack)."""
    missing = [m for m in modules if find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed)")


# What a real GRPOTrainer on the tiny LoRA model needs.
needs_stack = needs("torch", "transformers", "tokenizers", "peft", "trl", "datasets")


def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Varies between completions, so every step has a non-zero advantage."""
    return [float(len(c[0]["content"])) for c in completions]


def float_reward(completions: list[Any], **kwargs: Any) -> float:
    return 0.5


def lora_weights(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@needs_stack
def test_trains_two_steps_on_cpu(grpo_trainer: Any) -> None:
    import torch

    trainer = grpo_trainer(reward_funcs=[length_reward], learning_rate=1e-2)
    assert trainer.args.max_steps == 2
    assert trainer.args.report_to in ("none", [], ["none"])
    assert "grpo_trainer" in trainer.args.output_dir  # a pytest tmp folder
    if not torch.cuda.is_available():
        assert trainer.args.use_cpu
        assert not trainer.args.bf16
    before = lora_weights(trainer.model)
    assert before, "the model has LoRA adapters"
    out = trainer.train()
    assert out.global_step == 2
    after = lora_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


@needs("torch")  # the factory's CPU/GPU defaults
def test_broken_reward_function_fails_before_a_model_loads(
    grpo_trainer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_unsloth.grpo.fixture import GrpoTrainerFactory

    loads: list[str] = []
    monkeypatch.setattr(GrpoTrainerFactory, "_model", lambda self, backend: loads.append(backend))
    with pytest.raises(pytest.fail.Exception, match="float_reward: FAILED") as excinfo:
        grpo_trainer(reward_funcs=[float_reward])
    assert "returned float 0.5" in str(excinfo.value)
    assert loads == []


@needs("torch", "trl")
def test_config_error_fails_with_fix(grpo_trainer: Any) -> None:
    with pytest.raises(pytest.fail.Exception) as excinfo:
        grpo_trainer(reward_funcs=[length_reward], num_generations=3)
    text = str(excinfo.value)
    assert "generation_batch_size (2) must be divisible by num_generations (3)" in text
    assert "per_device_train_batch_size = 3" in text


@needs_stack
def test_length_budget_checked_against_the_model(grpo_trainer: Any) -> None:
    rows = [{"prompt": [{"role": "user", "content": "word " * 50}]}] * 2
    with pytest.raises(pytest.fail.Exception, match="length budget"):
        grpo_trainer(reward_funcs=[length_reward], train_dataset=rows, max_completion_length=2040)


@needs_stack
def test_own_dataset_and_model(grpo_trainer: Any, tmp_path: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pytest_unsloth.models import tiny

    path = tiny.build("qwen2", cache_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    rows = [{"prompt": f"Count to {i}:", "answer": str(i)} for i in range(4)]

    def plain_reward(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
        return [float(a in c) + len(c) / 100 for c, a in zip(completions, answer, strict=True)]

    trainer = grpo_trainer(
        reward_funcs=plain_reward,
        train_dataset=rows,
        model=model,
        processing_class=tiny.load_tokenizer(path),
        max_steps=1,
    )
    assert trainer.train().global_step == 1


@needs("torch", "transformers", "trl", "datasets")
def test_model_without_tokenizer_is_a_clear_failure(grpo_trainer: Any) -> None:
    with pytest.raises(pytest.fail.Exception, match="processing_class"):
        grpo_trainer(reward_funcs=[length_reward], model=object())


@pytest.mark.gpu
def test_unsloth_backend_trains_two_steps(grpo_trainer: Any) -> None:
    import torch

    trainer = grpo_trainer(reward_funcs=[length_reward], backend="unsloth", learning_rate=1e-2)
    assert "unsloth" in sys.modules
    assert trainer.args.bf16 == torch.cuda.is_bf16_supported()
    before = lora_weights(trainer.model)
    out = trainer.train()
    assert out.global_step == 2
    after = lora_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n].to(before[n].device)) for n in before)
    print(
        f"unsloth GRPO: 2 steps in {out.metrics.get('train_runtime')} s on "
        f"{torch.cuda.get_device_name(0)}, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    )


def test_plugin_modules_import_nothing_heavy() -> None:
    import subprocess

    code = (
        "import sys, pytest_unsloth, pytest_unsloth.grpo.fixture, "
        "pytest_unsloth.checks.grpo, pytest_unsloth.grpo\n"
        "heavy = [m for m in ('torch', 'trl', 'transformers', 'datasets', 'asyncio') "
        "if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
