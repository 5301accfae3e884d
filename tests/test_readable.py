"""``assert report.ok, report`` prints the found/why/fix text for every report type."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pytest_unsloth.grpo import budget, config, jsonl, rewards
from pytest_unsloth.util.readable import ReadableRepr, expand_message

REPORT_TYPES = [
    config.ConfigReport,
    budget.BudgetReport,
    jsonl.JsonlReport,
    rewards.RewardReport,
    rewards.FuncResult,
]


@pytest.mark.parametrize("cls", REPORT_TYPES, ids=lambda c: c.__name__)
def test_every_report_type_reprs_as_its_text(cls: type) -> None:
    # The dataclass decorator writes its own __repr__ unless told not to; that one would win.
    assert issubclass(cls, ReadableRepr)
    assert cls.__repr__ is ReadableRepr.__repr__, cls


def test_every_report_dataclass_is_listed() -> None:
    """A new report type with an ``ok`` property must join the list above."""
    found = {
        obj
        for module in (budget, config, jsonl, rewards)
        for obj in vars(module).values()
        if dataclasses.is_dataclass(obj) and isinstance(vars(obj).get("ok"), property)
    }
    assert found == set(REPORT_TYPES)


def _bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": \n{"answer": "2"}\n')
    return path


def test_repr_is_the_found_why_fix_text(tmp_path: Path) -> None:
    report = jsonl.check_jsonl(_bad_jsonl(tmp_path), "prompt")
    assert not report.ok
    assert repr(report) == str(report)
    assert "line 2:" in repr(report) and "JsonlReport(" not in repr(report)


def test_reward_report_and_its_results_read_as_text() -> None:
    def no_kwargs(completions: list[Any]) -> list[float]:
        return [0.0 for _ in completions]

    report = rewards.check_reward_funcs([no_kwargs])
    assert not report.ok
    text = repr(report)
    assert "found:" in text and "fix:" in text and "RewardReport(" not in text
    result = report.results[0]
    assert repr(result).startswith("no_kwargs: FAILED") and "found:" in repr(result)


def test_expand_message_restores_the_cut_text() -> None:
    class Text(ReadableRepr):
        def __str__(self) -> str:
            return "summary\n" + "found: " + "x" * 500 + "\nfix:   do this"

    report = Text()
    full = repr(report)
    cut = full[:118] + "..." + full[-119:]
    escaped = cut.replace("\n", "\\n")
    indented = cut.replace("\n", "\n  ")
    message = f"{indented}\nassert False\n +  where False = {escaped}.ok"
    expanded = expand_message(message, {"report": report, "other": 3})
    full_indented = full.replace("\n", "\n  ")
    assert expanded == f"{full_indented}\nassert False\n +  where False = report.ok"
    assert expand_message("unrelated", {"report": report}) == "unrelated"


@pytest.mark.parametrize("verbosity", [[], ["-v"]])
def test_failed_assert_prints_every_line_of_the_report(
    pytester: pytest.Pytester, tmp_path: Path, verbosity: list[str]
) -> None:
    data = _bad_jsonl(tmp_path)
    # Many bad lines make the report longer than pytest's cut at either verbosity.
    data.write_text(data.read_text() + "not json\n" * 400)
    pytester.makepyfile(
        f"""
        from pytest_unsloth import check_jsonl

        def test_data():
            report = check_jsonl({str(data)!r}, "prompt")
            assert report.ok, report
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", *verbosity)
    result.assert_outcomes(failed=1)
    from pytest_unsloth.grpo.jsonl import check_jsonl

    # The first line carries a timing; every finding line must be shown whole.
    for line in str(check_jsonl(data, "prompt")).splitlines()[1:]:
        assert any(line.strip() in out for out in result.outlines), line
    result.stdout.fnmatch_lines(["*where False = report.ok"])
    result.stdout.no_fnmatch_line("*JsonlReport(*")
