"""Benchmarks for the GRPO setup checks (issue 6 targets); prints the numbers, exit 1 on a miss.

    python benchmarks/bench_grpo.py [--jsonl-mb 100]

Targets: 5 reward functions x 64 completions < 50 ms after imports; length budget over 10,000
prompts < 2 s with a fast tokenizer; check_jsonl >= 50 MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The five reward functions of seed article 002 (GSM8K, XML answer format).
def correctness_reward_func(prompts, completions, answer, **kwargs):  # type: ignore[no-untyped-def]
    responses = [c[0]["content"] for c in completions]
    extracted = [
        r.split("<answer>")[-1].split("</answer>")[0].strip() if "<answer>" in r else ""
        for r in responses
    ]
    return [2.0 if e == a else 0.0 for e, a in zip(extracted, answer, strict=False)]


def int_reward_func(completions, **kwargs):  # type: ignore[no-untyped-def]
    responses = [c[0]["content"] for c in completions]
    extracted = [
        r.split("<answer>")[-1].split("</answer>")[0].strip() if "<answer>" in r else ""
        for r in responses
    ]
    return [0.5 if e.isdigit() else 0.0 for e in extracted]


def soft_format_reward_func(completions, **kwargs):  # type: ignore[no-untyped-def]
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    return [0.5 if re.search(pattern, c[0]["content"]) else 0.0 for c in completions]


def xmlcount_reward_func(completions, **kwargs):  # type: ignore[no-untyped-def]
    scores = []
    for c in completions:
        r = c[0]["content"]
        tags = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
        scores.append(sum(0.25 for t in tags if r.count(t) == 1))
    return scores


def strict_format_reward_func(completions, **kwargs):  # type: ignore[no-untyped-def]
    pattern = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
    return [0.5 if re.match(pattern, c[0]["content"]) else 0.0 for c in completions]


FUNCS = [
    xmlcount_reward_func,
    soft_format_reward_func,
    strict_format_reward_func,
    int_reward_func,
    correctness_reward_func,
]


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls, and the last result."""
    times = []
    out = None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_rewards() -> float:
    from pytest_unsloth import check_reward_funcs

    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Respond in XML."},
                {"role": "user", "content": f"What is {i} + {i}?"},
            ],
            "answer": str(2 * i),
        }
        for i in range(8)
    ]
    check_reward_funcs(FUNCS, rows, 8, num_prompts=8)  # imports torch, reads TRL's source
    seconds, report = timed(lambda: check_reward_funcs(FUNCS, rows, 8, num_prompts=8), 20)
    assert report.ok, report.format()
    assert report.num_completions == 64
    both, _ = timed(lambda: check_reward_funcs(FUNCS, num_prompts=8, num_generations=8), 20)
    print(f"reward funcs: 5 x 64 completions (dataset shape) {seconds * 1e3:.1f} ms;")
    print(f"              5 x 64 x 2 shapes (no dataset)    {both * 1e3:.1f} ms  [target < 50 ms]")
    return seconds


def bench_budget() -> float:
    from pytest_unsloth import check_length_budget
    from pytest_unsloth.models import tiny

    tokenizer = tiny.load_tokenizer(tiny.build("llama"))
    rng = random.Random(0)
    words = ["the", "model", "reward", "answer", "question", "number", "sum", "total", "step"]
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Respond in XML with reasoning and an answer."},
                {
                    "role": "user",
                    "content": " ".join(rng.choice(words) for _ in range(rng.randint(5, 120))),
                },
            ]
        }
        for _ in range(10_000)
    ]
    seconds, report = timed(
        lambda: check_length_budget(
            tokenizer, rows, max_seq_length=1024, max_completion_length=256
        ),
        3,
    )
    print(f"length budget: 10,000 prompts {seconds:.2f} s  [target < 2 s]  ({report.summary()})")
    return seconds


def bench_jsonl(megabytes: int) -> float:
    from pytest_unsloth import check_jsonl

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            while handle.tell() < megabytes * 1_000_000:
                row = {
                    "instruction": "Solve: " + "word " * rng.randint(5, 60),
                    "input": "",
                    "output": "答案 " + "reason " * rng.randint(10, 120),
                }
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        check_jsonl(path)  # warm the page cache
        seconds, report = timed(lambda: check_jsonl(path), 3)
    rate = report.size_bytes / 1e6 / seconds
    print(
        f"check_jsonl: {report.size_bytes / 1e6:.0f} MB, {report.lines} lines in {seconds:.2f} s "
        f"= {rate:.0f} MB/s  [target >= 50 MB/s]"
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl-mb", type=int, default=100, help="size of the JSONL test file")
    args = parser.parse_args()
    start = time.perf_counter()
    import torch  # noqa: F401  (timed separately: the targets are "after imports")
    import transformers  # noqa: F401

    print(f"imports: {time.perf_counter() - start:.1f} s (not counted)")
    misses = []
    if bench_rewards() >= 0.050:
        misses.append("reward funcs")
    if bench_budget() >= 2.0:
        misses.append("length budget")
    if bench_jsonl(args.jsonl_mb) < 50:
        misses.append("check_jsonl")
    if misses:
        print("MISSED: " + ", ".join(misses))
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
