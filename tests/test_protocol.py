"""The parent/child line protocol: both sides speak it, and a line outside it fails the probe."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_unsloth.probes import nccl
from pytest_unsloth.probes.protocol import (
    MARK,
    RANK_MARK,
    STATUSES,
    parse,
    result_line,
    stage_line,
)
from pytest_unsloth.probes.runner import run_subprocess

SRC = str(Path(__file__).parents[1] / "src")


def test_writers_and_parser_agree() -> None:
    text = "\n".join(
        [
            "chatter",
            stage_line("one"),
            "more chatter " + MARK,  # the marker mid-line is chatter, not protocol
            stage_line("two"),
            result_line({"status": "passed", "message": "ok", "data": {"x": 1}}),
        ]
    )
    out = parse(text)
    assert (out.stage, out.result, out.error) == (
        "two",
        {"status": "passed", "message": "ok", "data": {"x": 1}},
        None,
    )


def test_typed_status_lists_every_status_a_child_sends() -> None:
    assert STATUSES == ("passed", "failed", "skipped", "error")


def test_each_side_reads_only_its_own_marker() -> None:
    rank = "\n".join(
        [stage_line("all_reduce", RANK_MARK), result_line({"status": "passed"}, RANK_MARK)]
    )
    assert parse(rank) == parse("")
    assert parse(rank, RANK_MARK).stage == "all_reduce"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (
            f"{MARK} progress 50%",
            f"an unknown kind 'progress' (known: stage, result) in the line '{MARK} progress 50%'",
        ),
        (
            f"{MARK} result {{not json",
            "a result that is not valid JSON (Expecting property name enclosed in double quotes: "
            f"line 1 column 2 (char 1)) in the line '{MARK} result {{not json'",
        ),
        (
            f"{MARK} result [1, 2]",
            f"a result that is not a JSON object but list in the line '{MARK} result [1, 2]'",
        ),
        (
            f'{MARK} result {{"message": "ok"}}',
            f'a result without a status in the line \'{MARK} result {{"message": "ok"}}\'',
        ),
        (
            f'{MARK} result {{"status": "pass"}}',
            "a result with status 'pass', not one of passed, failed, skipped, error in the line "
            f'\'{MARK} result {{"status": "pass"}}\'',
        ),
    ],
)
def test_a_line_outside_the_protocol_is_an_error_naming_it(line: str, error: str) -> None:
    good = result_line({"status": "passed", "message": "ok"})
    out = parse(f"{stage_line('s')}\n{line}\n{good}")
    assert out.error == error
    assert out.result == {"status": "passed", "message": "ok"}  # still read, but not trusted


def test_the_first_bad_line_is_reported_and_long_lines_are_cut() -> None:
    long = f"{MARK} junk " + "x" * 500
    out = parse(f"{long}\n{MARK} other")
    assert out.error is not None
    assert out.error.startswith("an unknown kind 'junk'")
    assert out.error.endswith("x…'") and len(out.error) < 320


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    header = f"import sys\nsys.path.insert(0, {SRC!r})\n"
    header += "from pytest_unsloth.probes import emit, stage, run\n"
    script.write_text(header + textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_a_child_breaking_the_protocol_fails_with_the_line(tmp_path: Path) -> None:
    argv = _child(
        tmp_path,
        f"""
        stage("load")
        print("{MARK} progress 50%")
        run("x", {{"x": lambda: emit("passed", "all good")}})
        """,
    )
    res = run_subprocess(argv, "x", timeout=30)
    assert res.status == "failed"
    assert res.message == (
        f"broke the {MARK} line protocol in stage 'load': an unknown kind 'progress' "
        f"(known: stage, result) in the line '{MARK} progress 50%'"
    )


def test_a_result_without_a_status_fails_instead_of_passing_silently(tmp_path: Path) -> None:
    argv = _child(
        tmp_path,
        f"""
        import json
        print("{MARK} result " + json.dumps({{"message": "looks fine"}}))
        """,
    )
    res = run_subprocess(argv, "x", timeout=30)
    assert res.status == "failed"
    assert res.message.startswith(
        f"broke the {MARK} line protocol before its first stage: a result without a status"
    )


def test_a_rank_breaking_the_protocol_fails_its_attempt(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os
        print("{RANK_MARK} stage init_process_group", flush=True)
        if os.environ["RANK"] == "1":
            print("{RANK_MARK} result not-json", flush=True)
        else:
            print("{RANK_MARK} result " + json.dumps({{"status": "passed"}}), flush=True)
        """)
    )
    attempt = nccl.run_ranks(2, "gloo", 30.0, argv=[str(script)])
    assert attempt.status == "failed"
    assert attempt.message.startswith(
        f"rank 1 failed in 'init_process_group': broke the {RANK_MARK} line protocol: a result "
        "that is not valid JSON ("
    )
    assert attempt.message.endswith(f"in the line '{RANK_MARK} result not-json'")


def test_result_line_is_one_json_line() -> None:
    line = result_line({"status": "failed", "message": "two\nlines", "data": {"p": Path("/x")}})
    kind, _, payload = line[len(MARK) :].strip().partition(" ")
    assert kind == "result" and "\n" not in line
    assert json.loads(payload)["data"] == {"p": "/x"}
