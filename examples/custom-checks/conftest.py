"""Team rules as environment checks: they run beside the built-in ones under --unsloth-env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pytest_unsloth
from pytest_unsloth import CheckContext, CheckFailed


@pytest_unsloth.check("cluster-env", description="NCCL settings our cluster needs")
def cluster_env() -> str:
    """Our InfiniBand-less cluster hangs in NCCL init unless IB is disabled."""
    if os.environ.get("NCCL_IB_DISABLE") != "1":
        raise CheckFailed(
            found=f"NCCL_IB_DISABLE={os.environ.get('NCCL_IB_DISABLE')!r}",
            why="this cluster has no InfiniBand; NCCL probes for it and multi-GPU runs hang "
            "at start-up",
            fix="export NCCL_IB_DISABLE=1 (it is in our job template)",
        )
    return "NCCL_IB_DISABLE=1"


@pytest_unsloth.check("dataset-mount", description="the training data mount is readable")
def dataset_mount(ctx: CheckContext) -> str:
    """The dataset folder named by TRAIN_DATA_DIR must exist and be readable."""
    folder = os.environ.get("TRAIN_DATA_DIR")
    if not folder:
        pytest.skip("TRAIN_DATA_DIR is not set (not a training machine)")
    path = Path(folder)
    if not path.is_dir() or not os.access(path, os.R_OK):
        raise CheckFailed(
            found=f"TRAIN_DATA_DIR={folder} is not a readable folder",
            why="the trainer opens the dataset only after the model has loaded",
            fix="mount the dataset volume or fix TRAIN_DATA_DIR",
        )
    return f"{len(list(path.iterdir()))} entries in {folder}"


@pytest_unsloth.check(
    "tokenizer-template",
    isolated=True,
    timeout=120,
    cacheable=False,
    description="our model folder's tokenizer has a chat template",
)
def tokenizer_template() -> str:
    """Runs in a subprocess: it imports transformers, and a broken install must not take pytest
    down with it."""
    folder = os.environ.get("MODEL_DIR")
    if not folder:
        pytest.skip("MODEL_DIR is not set")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tok.chat_template:
        raise CheckFailed(
            found=f"{folder} has no chat_template",
            why="GRPO on conversational prompts applies the chat template; without one "
            "transformers raises at the first batch",
            fix="save the tokenizer with the template of the base model "
            "(tokenizer.chat_template = base.chat_template; tokenizer.save_pretrained(...))",
        )
    return f"chat template of {len(tok.chat_template)} characters"


def pytest_unsloth_modify_checks(config: pytest.Config, checks) -> None:
    """Our GPUs are shared: the scheduler reserves VRAM, so the free-VRAM check is noise here."""
    if "vram" in checks:
        checks.disable("vram", "the cluster scheduler reserves GPU memory per job")
