"""GSM8K-style reward functions (the ones seed article 002 trains with), in TRL's contract:
called by keyword with flat lists, one entry per completion, returning one float per completion."""

from __future__ import annotations

import re
from typing import Any


def _contents(completions: list[Any]) -> list[str]:
    return [c[0]["content"] if isinstance(c, list) else str(c) for c in completions]


def _answer_of(text: str) -> str:
    return text.split("<answer>")[-1].split("</answer>")[0].strip() if "<answer>" in text else ""


def correctness_reward_func(
    prompts: list[Any], completions: list[Any], answer: list[str], **kwargs: Any
) -> list[float]:
    """2.0 when the extracted answer equals the reference answer."""
    return [
        2.0 if _answer_of(r) == a else 0.0
        for r, a in zip(_contents(completions), answer, strict=True)
    ]


def int_reward_func(completions: list[Any], **kwargs: Any) -> list[float]:
    """0.5 when the answer is an integer."""
    return [0.5 if _answer_of(r).isdigit() else 0.0 for r in _contents(completions)]


def soft_format_reward_func(completions: list[Any], **kwargs: Any) -> list[float]:
    """0.5 when the reasoning/answer tags appear in order."""
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    return [0.5 if re.search(pattern, r, re.S) else 0.0 for r in _contents(completions)]


def xmlcount_reward_func(completions: list[Any], **kwargs: Any) -> list[float]:
    """0.25 per well-formed tag, to discourage truncated output."""
    tags = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
    return [sum(0.25 for t in tags if r.count(t) == 1) for r in _contents(completions)]
