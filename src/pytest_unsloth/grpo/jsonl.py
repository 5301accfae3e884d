"""Stream-check a JSONL training file: every bad line, with its number, without loading the file."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import Counter
from typing import Any

from pytest_unsloth.findings import Finding
from pytest_unsloth.util.readable import ReadableRepr

__all__ = ["SCHEMAS", "JsonlReport", "LineProblem", "check_jsonl"]

# schema -> (required non-empty text fields, optional text fields)
SCHEMAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction": (("instruction", "output"), ("input",)),
    "prompt": (("prompt", "answer"), ()),
    "messages": (("messages",), ()),
}
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
# Raw control bytes (tab, LF and CR excepted) and their JSON escapes: both reach the tokenizer.
_RAW_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ESCAPED_CONTROL = re.compile(rb"\\u00(?:0[0-8bBcCeEfF]|1[0-9a-fA-F]|7[fF])")


@dataclasses.dataclass(frozen=True)
class LineProblem:
    """One defect on one line (1-based)."""

    line: int
    code: str
    message: str


@dataclasses.dataclass(frozen=True, repr=False)
class JsonlReport(ReadableRepr):
    """The result of :func:`check_jsonl`."""

    path: str
    schema: str | None
    lines: int
    records: int
    size_bytes: int
    seconds: float
    bad: tuple[LineProblem, ...]
    bad_count: int
    problems: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """Whether every line is a valid record of the schema."""
        return self.bad_count == 0 and not self.problems

    @property
    def mb_per_s(self) -> float:
        """Throughput of the check, in MB/s."""
        return self.size_bytes / 1e6 / self.seconds if self.seconds else float("inf")

    def counts(self) -> Counter[str]:
        """Number of recorded bad lines per defect code."""
        return Counter(p.code for p in self.bad)

    def summary(self) -> str:
        """One line: size, records, schema and the number of bad lines."""
        return (
            f"{os.path.basename(self.path)}: {self.lines} lines, {self.records} valid "
            f"{self.schema or '?'} records, "
            f"{self.bad_count} defects ({self.size_bytes / 1e6:.1f} MB in {self.seconds:.2f} s)"
        )

    def format(self, limit: int = 20) -> str:
        """Render the summary, defect counts, and the first ``limit`` bad lines."""
        lines = [self.summary()]
        for p in self.problems:
            lines += [f"  [{p.severity}] {p.code}", p.format("    ")]
        for code, n in sorted(self.counts().items()):
            numbers = _ranges([b.line for b in self.bad if b.code == code])
            lines.append(f"  {code}: {n} line{'s' if n != 1 else ''} ({numbers})")
        for bad in self.bad[:limit]:
            lines.append(f"  line {bad.line}: {bad.message}")
        if self.bad_count > limit:
            lines.append(f"  ... {self.bad_count - limit} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _ranges(numbers: list[int], limit: int = 12) -> str:
    """Compact '1-4, 9, 12-13' text for sorted line numbers."""
    spans: list[str] = []
    start = prev = None
    for n in numbers:
        if start is None:
            start = prev = n
        elif prev is not None and n == prev + 1:
            prev = n
        else:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = n
    if start is not None:
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
    text = ", ".join(spans[:limit])
    return text + (", ..." if len(spans) > limit else "")


def _detect(record: dict[str, Any]) -> str | None:
    """Guess the schema from one record's keys."""
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "instruction"
    if "prompt" in record:
        return "prompt"
    return None


def _field_problems(record: dict[str, Any], schema: str) -> list[tuple[str, str]]:
    """Return (code, message) for each schema violation in one record."""
    out: list[tuple[str, str]] = []
    required, optional = SCHEMAS[schema]
    for key in required:
        if key not in record:
            out.append(("missing-field", f"missing field {key!r} (fields: {', '.join(record)})"))
            continue
        value = record[key]
        if schema == "messages":
            out += _message_problems(value)
        elif schema == "prompt" and key == "prompt" and isinstance(value, list):
            out += _message_problems(value, "prompt")
        elif schema == "prompt" and key == "answer" and isinstance(value, int | float):
            if isinstance(value, bool):
                out.append(("wrong-type", "'answer' is a bool, expected text or a number"))
        elif not isinstance(value, str):
            out.append(("wrong-type", f"{key!r} is {type(value).__name__}, expected a string"))
        elif not value.strip():
            out.append(("empty-field", f"{key!r} is empty"))
    for key in optional:
        if key in record and not isinstance(record[key], str):
            out.append(
                ("wrong-type", f"{key!r} is {type(record[key]).__name__}, expected a string")
            )
    return out


def _message_problems(value: Any, key: str = "messages") -> list[tuple[str, str]]:
    """Check a chat: a non-empty list of {'role': str, 'content': str} dicts."""
    if not isinstance(value, list):
        return [("wrong-type", f"{key!r} is {type(value).__name__}, expected a list of messages")]
    if not value:
        return [("empty-field", f"{key!r} is an empty list")]
    out: list[tuple[str, str]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            out.append(("wrong-type", f"{key}[{i}] is {type(message).__name__}, expected a dict"))
            continue
        role, content = message.get("role"), message.get("content")
        if role is None or "content" not in message:
            missing = "role" if role is None else "content"
            out.append(("missing-field", f"{key}[{i}] has no {missing!r}"))
        elif role not in _ROLES:
            out.append(
                (
                    "wrong-type",
                    f"{key}[{i}]['role'] = {role!r} is not one of {', '.join(sorted(_ROLES))}",
                )
            )
        elif not isinstance(content, str):
            if not isinstance(content, list):  # a list is multimodal content parts
                out.append(
                    (
                        "wrong-type",
                        f"{key}[{i}]['content'] is {type(content).__name__}, expected a string",
                    )
                )
        elif not content.strip() and role != "system":
            out.append(("empty-field", f"{key}[{i}] ({role}) has empty content"))
    return out


@dataclasses.dataclass
class _BadLines:
    """Every bad line counted; the first ``max_reported`` kept with their messages."""

    max_reported: int
    kept: list[LineProblem] = dataclasses.field(default_factory=list)
    count: int = 0

    def flag(self, line: int, code: str, message: str) -> None:
        """Record one defect of line ``line``."""
        self.count += 1
        if len(self.kept) < self.max_reported:
            self.kept.append(LineProblem(line, code, message))


def _line_body(number: int, raw: bytes, bad: _BadLines) -> tuple[bytes, bool]:
    """The line without its line ending (and the file's BOM); False when either was wrong."""
    ok = True
    if raw.endswith(b"\r\n"):
        bad.flag(
            number, "crlf", "CRLF line ending (Windows): loaders splitting on \\n keep a stray \\r"
        )
        ok = False
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        bad.flag(number, "bom", "UTF-8 byte order mark at the start of the file")
        raw = raw[3:]
        ok = False
    return raw, ok


def _parse_record(number: int, raw: bytes, bad: _BadLines) -> tuple[dict[str, Any] | None, bool]:
    """The line's JSON object (None when it has none); False when a defect was flagged."""
    if not raw.strip():
        bad.flag(number, "blank-line", "blank line")
        return None, False
    match = _RAW_CONTROL.search(raw)
    if match is not None:
        message = f"raw control character {match.group()!r} at column {match.start() + 1}"
        bad.flag(number, "control-char", message)
        return None, False
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as exc:
        bad.flag(number, "not-utf8", f"not UTF-8: {exc.reason} at byte {exc.start + 1}")
        return None, False
    except ValueError as exc:
        bad.flag(number, "invalid-json", f"invalid JSON: {exc}")
        return None, False
    except RecursionError:  # valid JSON nested deeper than Python's parser can follow
        bad.flag(number, "invalid-json", "JSON nested too deeply to read (not a training record)")
        return None, False
    ok = True
    escaped = _ESCAPED_CONTROL.search(raw)
    if escaped is not None:
        bad.flag(
            number,
            "control-char",
            f"escaped control character {escaped.group().decode()} at column {escaped.start() + 1}",
        )
        ok = False
    if not isinstance(record, dict):
        message = f"line is a JSON {type(record).__name__}, expected an object"
        bad.flag(number, "wrong-type", message)
        return None, False
    return record, ok


def check_jsonl(
    path: str | os.PathLike[str],
    schema: str | None = None,
    *,
    max_reported: int = 10_000,
) -> JsonlReport:
    """Stream a JSONL file; report every bad line by number (JSON, fields, types, control, CRLF)."""
    if schema is not None and schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)} or None")
    name = os.fspath(path)
    started = time.perf_counter()
    bad = _BadLines(max_reported)
    records = number = 0
    problems: list[Finding] = []
    detected = schema
    size = os.path.getsize(name)
    with open(name, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            body, ends_ok = _line_body(number, raw, bad)
            record, parsed_ok = _parse_record(number, body, bad)
            if record is None:
                continue
            if detected is None:
                detected = _detect(record)
                if detected is None:
                    problems.append(_unknown_schema(number, record))
                    break
            faults = _field_problems(record, detected)
            for code, message in faults:
                bad.flag(number, code, message)
            if ends_ok and parsed_ok and not faults:
                records += 1
    if number == 0:
        problems.append(
            Finding(
                found=f"{name} is empty",
                why="there is nothing to train on",
                fix="point unsloth_dataset at the real file",
                code="empty-file",
            )
        )
    elapsed = time.perf_counter() - started
    return JsonlReport(
        name, detected, number, records, size, elapsed, tuple(bad.kept), bad.count, tuple(problems)
    )


def _unknown_schema(number: int, record: dict[str, Any]) -> Finding:
    """Error: the first record matches none of the schemas."""
    return Finding(
        found=f"line {number} has fields {', '.join(record) or 'none'}: none "
        "of messages, instruction/output, prompt/answer",
        why="a trainer cannot tell which field is the prompt",
        fix="set unsloth_dataset_schema, or use one of the schemas: "
        "instruction/input/output, prompt/answer, messages",
        code="unknown-schema",
    )
