"""The reward function of seed article 000: it assumes completions arrive nested per prompt
(completions[i] = the num_generations completions of prompt i) and extends a flat list.
TRL passes a flat list, one entry per completion, so completions[i] is one completion."""

from __future__ import annotations

from typing import Any


def extract_xml_answer(text: str) -> str:
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def correctness_reward_func(
    prompts: Any, completions: Any, answer: Any, **kwargs: Any
) -> list[float]:
    batch_rewards: list[float] = []
    for i in range(len(prompts)):
        this_completions = completions[i]
        scores = []
        for comp in this_completions:
            content = comp[0]["content"]
            scores.append(2.0 if extract_xml_answer(content) == answer[i] else 0.0)
        batch_rewards.extend(scores)
    return batch_rewards
