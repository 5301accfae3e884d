"""check_jsonl: every kind of bad line, by number, for each schema; streaming."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import pytest_unsloth
from pytest_unsloth.grpo.jsonl import check_jsonl


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


GOOD = {
    "instruction": {"instruction": "Add.", "input": "2 2", "output": "4"},
    "prompt": {"prompt": "What is 2 + 2?", "answer": "4"},
    "messages": {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
}


@pytest.mark.parametrize("schema", list(GOOD))
def test_clean_file_passes_and_schema_is_detected(tmp_path: Path, schema: str) -> None:
    path = write(tmp_path / "d.jsonl", [line(GOOD[schema])] * 5)
    report = check_jsonl(path)
    assert report.ok, report.format()
    assert (report.schema, report.lines, report.records) == (schema, 5, 5)
    assert check_jsonl(path, schema).ok


def test_every_defect_reported_with_its_line_number(tmp_path: Path) -> None:
    good = line(GOOD["prompt"])
    lines = [
        good,  # 1
        b'{"prompt": "x", "answer": "1"}\r\n',  # 2 CRLF
        b'{"prompt": "x", "answer": }\n',  # 3 invalid JSON
        line({"answer": "1"}),  # 4 missing prompt
        line({"prompt": "   ", "answer": "1"}),  # 5 empty prompt
        line({"prompt": 7, "answer": "1"}),  # 6 wrong type
        b'{"prompt": "a\x07b", "answer": "1"}\n',  # 7 raw control character
        line({"prompt": "a\u0000b", "answer": "1"}),  # 8 escaped control character
        b"\n",  # 9 blank
        b'["prompt", "answer"]\n',  # 10 not an object
        b'{"prompt": "caf\xe9", "answer": "1"}\n',  # 11 latin-1, not UTF-8
        good,  # 12
    ]
    report = check_jsonl(write(tmp_path / "bad.jsonl", lines))
    found = {(p.line, p.code) for p in report.bad}
    assert found == {
        (2, "crlf"),
        (3, "invalid-json"),
        (4, "missing-field"),
        (5, "empty-field"),
        (6, "wrong-type"),
        (7, "control-char"),
        (8, "control-char"),
        (9, "blank-line"),
        (10, "wrong-type"),
        (11, "not-utf8"),
    }
    assert (report.lines, report.records, report.bad_count) == (12, 2, 10)
    assert not report.ok
    by_line = {p.line: p.message for p in report.bad}
    assert "missing field 'prompt' (fields: answer)" in by_line[4]
    assert "'prompt' is int, expected a string" in by_line[6]
    assert "\\u0000" in by_line[8]
    text = report.format()
    assert "control-char: 2 lines (7-8)" in text
    assert "line 3: invalid JSON" in text


def test_messages_schema_defects(tmp_path: Path) -> None:
    lines = [
        line({"messages": []}),
        line({"messages": "hi"}),
        line({"messages": [{"role": "user"}]}),
        line({"messages": [{"role": "robot", "content": "x"}]}),
        line({"messages": [{"role": "user", "content": ""}]}),
        line({"messages": [{"role": "user", "content": 3}]}),
        line({"messages": ["hi"]}),
    ]
    report = check_jsonl(write(tmp_path / "m.jsonl", lines), "messages")
    assert [(p.line, p.code) for p in report.bad] == [
        (1, "empty-field"),
        (2, "wrong-type"),
        (3, "missing-field"),
        (4, "wrong-type"),
        (5, "empty-field"),
        (6, "wrong-type"),
        (7, "wrong-type"),
    ]


def test_instruction_schema_defects(tmp_path: Path) -> None:
    lines = [
        line({"instruction": "Add.", "output": "4"}),  # input is optional
        line({"instruction": "Add.", "input": 2, "output": "4"}),
        line({"instruction": "", "output": "4"}),
        line({"instruction": "Add."}),
    ]
    report = check_jsonl(write(tmp_path / "i.jsonl", lines))
    assert report.schema == "instruction"
    assert [(p.line, p.code) for p in report.bad] == [
        (2, "wrong-type"),
        (3, "empty-field"),
        (4, "missing-field"),
    ]


def test_prompt_schema_accepts_conversational_prompts_and_numeric_answers(
    tmp_path: Path,
) -> None:
    lines = [
        line({"prompt": [{"role": "user", "content": "2+2?"}], "answer": 4}),
        line({"prompt": "2+2?", "answer": True}),
    ]
    report = check_jsonl(write(tmp_path / "p.jsonl", lines), "prompt")
    assert [(p.line, p.code) for p in report.bad] == [(2, "wrong-type")]


def test_bom_and_wrong_explicit_schema(tmp_path: Path) -> None:
    path = write(tmp_path / "b.jsonl", [b"\xef\xbb\xbf" + line(GOOD["prompt"])])
    assert [p.code for p in check_jsonl(path).bad] == ["bom"]
    report = check_jsonl(write(tmp_path / "w.jsonl", [line(GOOD["prompt"])]), "messages")
    assert [p.code for p in report.bad] == ["missing-field"]


def test_a_line_nested_past_the_parsers_depth_is_a_bad_line(tmp_path: Path) -> None:
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n"  # past every Python's limit
    path = write(tmp_path / "d.jsonl", [line(GOOD["prompt"]), deep, line(GOOD["prompt"])])
    report = check_jsonl(path)
    assert [(p.line, p.code) for p in report.bad] == [(2, "invalid-json")]
    assert "nested too deeply" in report.bad[0].message and report.records == 2


def test_unknown_schema_and_empty_file(tmp_path: Path) -> None:
    report = check_jsonl(write(tmp_path / "u.jsonl", [line({"text": "hi"})]))
    assert [p.code for p in report.problems] == ["unknown-schema"]
    assert "unsloth_dataset_schema" in report.problems[0].fix
    assert [p.code for p in check_jsonl(write(tmp_path / "e.jsonl", [])).problems] == ["empty-file"]
    with pytest.raises(ValueError, match="unknown schema 'chat'"):
        check_jsonl(tmp_path / "e.jsonl", "chat")


def test_reported_lines_are_capped_but_all_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "many.jsonl", [b"not json\n"] * 500)
    report = check_jsonl(path, max_reported=10)
    assert (len(report.bad), report.bad_count) == (10, 500)
    assert "490 more" in report.format(limit=10)


def test_streams_without_loading_the_file(tmp_path: Path) -> None:
    row = line({"instruction": "Explain " + "word " * 150, "input": "", "output": "ok " * 200})
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as handle:
        for _ in range(20_000):
            handle.write(row)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        report = check_jsonl(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok
    assert size > 20_000_000
    assert peak < size / 20, f"peak {peak} bytes for a {size} byte file"


def test_public_export() -> None:
    assert pytest_unsloth.check_jsonl is check_jsonl
