"""Tests a training project keeps beside its code: they run on CPU with the tiny default model,
on the GPU with unsloth when it is installed, and skip with exact numbers where they cannot."""

from __future__ import annotations

import pytest
from rewards import answer_reward, format_reward

from pytest_unsloth import assert_reward_funcs

DATA = [
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"},
    {"prompt": [{"role": "user", "content": "What is 3 + 5?"}], "answer": "8"},
]


def test_reward_functions_follow_trls_contract():
    assert_reward_funcs([answer_reward, format_reward], dataset=DATA, num_generations=4)


def test_model_loads_in_4bit(loaded_4bit_model):
    model, tokenizer = loaded_4bit_model
    assert tokenizer.pad_token is not None
    ids = tokenizer("hello", return_tensors="pt").input_ids.to(model.device)
    assert model(ids).logits.shape[-1] >= len(tokenizer)


def test_lora_adapters_train(peft_model):
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_two_grpo_steps(grpo_trainer):
    trainer = grpo_trainer(
        reward_funcs=[answer_reward, format_reward], train_dataset=DATA * 4, max_steps=2
    )
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.requires_vram(8)
@pytest.mark.requires_kernel("bitsandbytes")
def test_on_a_real_gpu(gpu, loaded_4bit_model):
    assert gpu.free_bytes > 0
    assert str(loaded_4bit_model.model.device).startswith("cuda")


@pytest.mark.requires_vram(100_000)
def test_needs_more_than_any_gpu_has():
    raise AssertionError("a marker must skip this before it runs")
