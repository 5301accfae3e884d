"""Shared test configuration: offline Hub, GPU-only tests gated by UNSLOTH_TEST_GPU=1."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ON_GPU_MACHINE = os.environ.get("UNSLOTH_TEST_GPU") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` unless UNSLOTH_TEST_GPU=1 (set on the lent GPU machine)."""
    if ON_GPU_MACHINE:
        return
    skip = pytest.mark.skip(reason="needs the GPU machine (set UNSLOTH_TEST_GPU=1 there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
