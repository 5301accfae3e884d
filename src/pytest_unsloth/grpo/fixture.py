"""The ``grpo_trainer`` factory fixture: check the GRPO setup, then build a real GRPOTrainer.

Registered as a plugin by ``pytest_unsloth.plugin`` on every run, so this module imports only
the standard library and pytest; TRL, transformers, peft and unsloth load when a test calls the
factory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_unsloth.util.quiet import library_noise_silenced
from pytest_unsloth.util.scratch import with_torch_caches

__all__ = ["DEFAULT_PROMPTS", "GrpoTrainerFactory", "grpo_trainer"]

# The default training rows: conversational prompts with an `answer` column, like GSM8K recipes.
DEFAULT_PROMPTS: tuple[tuple[str, str], ...] = (
    ("What is 2 + 2?", "4"),
    ("What is 3 + 5?", "8"),
    ("What is 10 - 7?", "3"),
    ("What is 6 + 6?", "12"),
    ("What is 9 - 4?", "5"),
    ("What is 1 + 8?", "9"),
    ("What is 7 + 0?", "7"),
    ("What is 5 + 5?", "10"),
)
_SYSTEM = "Answer with <answer>NUMBER</answer>."


def _default_rows() -> list[dict[str, Any]]:
    return [
        {
            "prompt": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": q}],
            "answer": a,
        }
        for q, a in DEFAULT_PROMPTS
    ]


def _rows_of(dataset: Any) -> list[dict[str, Any]]:
    """A few rows of a datasets.Dataset or a list of dicts, for the reward check."""
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        return [dict(r) for r in dataset.select(range(min(len(dataset), 64)))]
    return [dict(r) for r in list(dataset)[:64]]


def _as_dataset(train_dataset: Any, rows: list[dict[str, Any]]) -> Any:
    """The training dataset as GRPOTrainer takes it (the default rows when none was given)."""
    from datasets import Dataset

    if train_dataset is None:
        return Dataset.from_list(rows)
    if isinstance(train_dataset, list):
        return Dataset.from_list(train_dataset)
    return train_dataset


class GrpoTrainerFactory:
    """``grpo_trainer(reward_funcs=[...], train_dataset=..., **config_overrides)``."""

    def __init__(self, request: pytest.FixtureRequest, basetemp: Path, cache: Path) -> None:
        self._request = request
        self._basetemp = basetemp
        self._cache = cache
        self._count = 0
        self._explicit_backend = False

    def backend(self) -> str:
        """``unsloth`` on a CUDA machine with unsloth installed, else ``transformers``."""
        from pytest_unsloth.grpo.problems import installed_version

        if installed_version("unsloth") is None:
            return "transformers"
        import torch

        return "unsloth" if torch.cuda.is_available() else "transformers"

    @with_torch_caches
    # The library warnings our own construction causes stay out of the user's output.
    @library_noise_silenced()
    def __call__(
        self,
        reward_funcs: Sequence[Any] | Callable[..., Any],
        train_dataset: Any = None,
        *,
        model: Any = None,
        processing_class: Any = None,
        backend: str | None = None,
        check: bool = True,
        **config_overrides: Any,
    ) -> Any:
        """Check the setup (reward functions, config, length budget), then build a GRPOTrainer."""
        from pytest_unsloth.compat.distributions import require_installed

        require_installed(("torch", "transformers", "trl", "datasets"), "grpo_trainer")
        self._explicit_backend = backend is not None
        backend = self._chosen_backend(backend)
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if model is not None and processing_class is None:
            pytest.fail(
                "grpo_trainer(model=...) also needs processing_class=<its tokenizer>",
                pytrace=False,
            )
        rows = _default_rows() if train_dataset is None else _rows_of(train_dataset)
        config = self._config(backend, config_overrides)
        if check:
            # Seconds-cheap checks first: a broken reward function fails before a model loads.
            self._check_setup(funcs, rows, config, backend)
        if model is None:
            model, tokenizer = self._model(backend)
        else:
            tokenizer = processing_class
        if processing_class is not None:
            tokenizer = processing_class
        if check:
            every_row = rows if train_dataset is None else train_dataset
            self._check_budget(every_row, tokenizer, model, config, backend)

        from trl import GRPOConfig, GRPOTrainer  # type: ignore[attr-defined]

        return GRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=GRPOConfig(**config),
            train_dataset=_as_dataset(train_dataset, rows),
            processing_class=tokenizer,
        )

    def _chosen_backend(self, backend: str | None) -> str:
        """The backend asked for (else the default), with unsloth imported first when chosen."""
        backend = backend or self.backend()
        if backend not in ("unsloth", "transformers"):
            pytest.fail(
                f"grpo_trainer(backend={backend!r}): use 'unsloth' or 'transformers'",
                pytrace=False,
            )
        if backend == "unsloth":
            # unsloth patches transformers, trl and peft only if it is imported before them.
            import unsloth  # noqa: F401
        return backend

    def _config(self, backend: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Short, CPU-safe defaults under the caller's overrides."""
        import torch

        cuda = torch.cuda.is_available()
        bf16 = cuda and torch.cuda.is_bf16_supported()
        self._count += 1
        config: dict[str, Any] = {
            "output_dir": str(self._basetemp / f"grpo-{self._count}"),
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "num_generations": 2,
            "max_completion_length": 8,
            "learning_rate": 1e-4,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "seed": 0,
            "use_cpu": not cuda,
            "bf16": bf16,
            "fp16": cuda and not bf16,
        }
        config.update(overrides)
        return config

    def _check_setup(
        self, funcs: list[Any], rows: list[dict[str, Any]], config: dict[str, Any], backend: str
    ) -> None:
        """Reward functions and GRPOConfig; fail the test with their report."""
        from pytest_unsloth.grpo.config import check_grpo_config
        from pytest_unsloth.grpo.rewards import check_reward_funcs

        rewards = check_reward_funcs(funcs, rows, int(config.get("num_generations", 2)))
        if not rewards.ok:
            pytest.fail("grpo_trainer: reward functions would fail:\n" + rewards.format(), False)
        cfg = check_grpo_config(config, unsloth=backend == "unsloth")
        if not cfg.ok:
            pytest.fail("grpo_trainer: GRPOConfig problems:\n" + cfg.format(), False)

    def _check_budget(
        self,
        rows: Any,
        tokenizer: Any,
        model: Any,
        config: dict[str, Any],
        backend: str,
    ) -> None:
        """Prompt + completion lengths against the model's context."""
        from pytest_unsloth.grpo.budget import check_length_budget

        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if backend == "unsloth":
            context = self._settings_value("max_seq_length", context)
        if not isinstance(context, int):
            return
        budget = check_length_budget(
            tokenizer,
            rows,
            max_seq_length=context,
            max_completion_length=int(config.get("max_completion_length", 8)),
        )
        if not budget.ok:
            pytest.fail("grpo_trainer: length budget:\n" + budget.format(), False)

    def _settings_value(self, name: str, default: Any) -> Any:
        try:
            from pytest_unsloth.settings import get_settings

            return getattr(get_settings(self._request.config), name, default)
        except Exception:  # settings module absent or not configured: use the default
            return default

    def _model(self, backend: str) -> tuple[Any, Any]:
        """The ``peft_model`` fixture's model when available, else a tiny LoRA model."""
        try:
            value = self._request.getfixturevalue("peft_model")
        except pytest.FixtureLookupError:
            return self._tiny_model(backend)
        loaded: Any = None
        with contextlib.suppress(pytest.FixtureLookupError):
            # Already set up for peft_model (it depends on it): its tokenizer and backend.
            loaded = self._request.getfixturevalue("loaded_4bit_model")
        used = getattr(loaded, "backend", None)
        if used is not None and used != backend and self._explicit_backend:
            pytest.fail(
                f"grpo_trainer(backend={backend!r}) but the peft_model fixture loaded with the "
                f"{used} backend ({getattr(loaded, 'backend_reason', '')})",
                pytrace=False,
            )
        tokenizer = getattr(loaded, "tokenizer", None)
        if tokenizer is not None:
            return value, tokenizer
        return _unpack(value)

    def _tiny_model(self, backend: str) -> tuple[Any, Any]:
        """Build the tiny offline Llama with LoRA on q/k/v/o (unsloth 4-bit on GPU)."""
        from pytest_unsloth.models import tiny

        path = tiny.build("llama", seed=0, cache_dir=self._cache)
        tokenizer = tiny.load_tokenizer(path)
        r = self._settings_value("lora_r", 8)
        alpha = self._settings_value("lora_alpha", 16)
        targets = list(
            self._settings_value("lora_target_modules", ("q_proj", "k_proj", "v_proj", "o_proj"))
        )
        if backend == "unsloth":
            from unsloth import FastLanguageModel

            model, tokenizer = FastLanguageModel.from_pretrained(
                str(path),
                max_seq_length=self._settings_value("max_seq_length", 256),
                load_in_4bit=True,
                fast_inference=False,
            )
            model = FastLanguageModel.get_peft_model(
                model,
                r=r,
                lora_alpha=alpha,
                target_modules=targets,
                use_gradient_checkpointing="unsloth",
                random_state=0,
            )
            return model, tokenizer
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
        base = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(base, lora), tokenizer


def _unpack(value: Any) -> tuple[Any, Any]:
    """Accept (model, tokenizer), an object with .model/.tokenizer, or a model with a tokenizer."""
    if isinstance(value, tuple) and len(value) == 2:
        return value[0], value[1]
    model = getattr(value, "model", None)
    tokenizer = getattr(value, "tokenizer", None)
    if model is not None and tokenizer is not None and not hasattr(value, "forward"):
        return model, tokenizer
    if tokenizer is not None:
        return value, tokenizer
    name = getattr(getattr(value, "config", None), "name_or_path", None)
    if name and os.path.isdir(name):
        from pytest_unsloth.models import tiny

        return value, tiny.load_tokenizer(name)
    pytest.fail(
        "grpo_trainer: the peft_model fixture gave no tokenizer; pass "
        "grpo_trainer(..., model=model, processing_class=tokenizer)",
        pytrace=False,
    )


@pytest.fixture
def grpo_trainer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> GrpoTrainerFactory:
    """Factory: grpo_trainer(reward_funcs, train_dataset=None, **config) -> checked GRPOTrainer."""
    return GrpoTrainerFactory(
        request,
        tmp_path_factory.mktemp("grpo_trainer"),
        tmp_path_factory.getbasetemp() / "pytest-unsloth-tiny-models",
    )
