"""The project's reward functions (TRL's contract: keyword call, flat lists, one float each)."""

from __future__ import annotations

import re
from typing import Any


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else str(completion)


def answer_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when <answer>N</answer> holds the reference answer."""
    found = [re.search(r"<answer>\s*(.*?)\s*</answer>", _text(c), re.S) for c in completions]
    return [1.0 if m and m.group(1) == a else 0.0 for m, a in zip(found, answer, strict=True)]


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """0.5 for any <answer> tag, so an untrained model still gets a signal."""
    return [0.5 if "<answer>" in _text(c) else 0.0 for c in completions]
