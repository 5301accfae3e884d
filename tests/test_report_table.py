"""The terminal table fits the terminal; the JSON summary always has its four counts; probe
origin tags say only what happened."""

from __future__ import annotations

import json

import pytest

from pytest_unsloth.checks.report import _probe_origin

LONG = " ".join(f"word{i}" for i in range(60))

CONFTEST = f"""
import pytest_unsloth

@pytest_unsloth.check("long-detail")
def long_detail() -> str:
    return {LONG!r}
"""


def _table(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if "unsloth environment" in line)
    return [line for line in lines[start + 1 :] if line and not line.startswith("=")]


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_table_fits_the_terminal_width(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=python,cuda,long-detail")
    rows = _table(result.outlines)
    assert any(r.startswith("long-detail") for r in rows), result.outlines
    assert all(len(r) <= columns for r in rows), [(len(r), r) for r in rows]
    cut = next(r for r in rows if r.startswith("long-detail"))
    assert cut.endswith("…") and "word59" not in cut


def test_verbose_table_keeps_the_whole_detail(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=python,long-detail", "-v")
    # -v keeps each row's full text on one line, so a log can be searched for it.
    result.stdout.fnmatch_lines([f"long-detail *passed *{LONG}"])


def test_json_summary_always_has_four_counts(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        "--unsloth-env", "--unsloth-checks=python", "--unsloth-report=r.json"
    )
    assert result.ret == 0
    summary = json.loads((pytester.path / "r.json").read_text())["summary"]
    assert summary == {"passed": 1, "failed": 0, "skipped": 0, "error": 0}


def _rec(**probe: object) -> dict[str, object]:
    return {"name": "x", "probes": [{"name": "flash-attn", **probe}]}


def test_unprobed_shared_result_gets_no_tag() -> None:
    # "flash-attn is not installed" was decided without a probe: no worker probed anything.
    assert _probe_origin(_rec(origin="shared", duration=0.0, age_s=None)) == ""


def test_shared_result_of_a_real_probe_or_of_the_cache() -> None:
    assert _probe_origin(_rec(origin="shared", duration=2.5, age_s=None)) == (
        " [flash-attn probed by another xdist worker, 2.5 s]"
    )
    assert _probe_origin(_rec(origin="shared", duration=2.5, age_s=120.0)) == (
        " [flash-attn from cache, 2 min old]"
    )
    assert _probe_origin(_rec(origin="run", duration=1.0)) == " [flash-attn probed now, 1.0 s]"


def test_xdist_rows_of_uninstalled_packages_have_no_worker_tag(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    checks = "--unsloth-checks=flash-attn,xformers,vllm,triton,unsloth,bitsandbytes"
    result = pytester.runpytest_subprocess("--unsloth-env", checks, "-n", "2", timeout=120)
    rows = _table(result.outlines)
    assert len(rows) == 6, result.outlines
    assert not [r for r in rows if "xdist worker" in r], rows
