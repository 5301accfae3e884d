"""The line protocol between a probe child and its parent, spoken by both sides.

A child writes ``@@unsloth-probe stage NAME`` when it enters a stage (so a parent that must
kill it can say where it was) and ends with one ``@@unsloth-probe result {json}`` line whose
object has a ``status``. Every other stdout line is the child's own chatter and is ignored. A
line that starts with the marker but is not one of these is an error, never silence: the probe
fails and the message names the line. The ranks of the nccl probe speak the same protocol under
their own marker (``@@unsloth-rank``), so their lines never mix with the probe's.

Standard library only: the child imports this before anything heavy.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from typing import Any, Literal, get_args

MARK = "@@unsloth-probe"
RANK_MARK = "@@unsloth-rank"

# passed / failed / skipped: what the probe found; error: the check code itself raised.
Status = Literal["passed", "failed", "skipped", "error"]
STATUSES: tuple[str, ...] = get_args(Status)

KINDS = ("stage", "result")
LINE_SHOWN = 200  # characters of an offending line quoted in the error


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What a probe found. ``status`` is passed, failed or skipped (error: the check raised)."""

    name: str
    status: Status
    message: str
    stage: str | None = None
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    duration: float = 0.0
    stderr_tail: str = ""
    origin: str = "run"  # run: probed now; shared: by another xdist worker; cache: earlier run
    age_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProbeResult:
        """Inverse of ``to_json`` (unknown keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


# ------------------------------------------------------------------------------------------------
# Child side: the writers.


def stage_line(name: str, mark: str = MARK) -> str:
    """The line announcing stage NAME."""
    return f"{mark} stage {name}"


def result_line(payload: Mapping[str, Any], mark: str = MARK) -> str:
    """The line carrying the result payload (must hold a ``status``)."""
    return f"{mark} result {json.dumps(payload, default=str)}"


def write_line(line: str, lead: str = "\n") -> None:
    """Write one protocol line to stdout at once; ``lead`` ends any chatter left unterminated."""
    sys.stdout.write(f"{lead}{line}\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------
# Parent side: the parser.


@dataclasses.dataclass(frozen=True)
class Output:
    """What a child's stdout said: its last stage, its result payload, and any protocol error."""

    stage: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None  # the first line that broke the protocol, and how


def _shown(line: str) -> str:
    return repr(line if len(line) <= LINE_SHOWN else line[:LINE_SHOWN] + "…")


def _result_payload(payload: str) -> dict[str, Any] | str:
    """The result object, or what is wrong with it."""
    try:
        value = json.loads(payload)
    except ValueError as exc:
        return f"a result that is not valid JSON ({exc})"
    if not isinstance(value, dict):
        return f"a result that is not a JSON object but {type(value).__name__}"
    if "status" not in value:
        return "a result without a status"
    if value["status"] not in STATUSES:
        return f"a result with status {value['status']!r}, not one of {', '.join(STATUSES)}"
    return value


def parse(stdout: str, mark: str = MARK) -> Output:
    """Read a child's stdout: the last stage and result win; the first bad line is the error."""
    stage: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    for line in stdout.splitlines():
        if not line.startswith(mark):
            continue
        kind, _, payload = line[len(mark) :].strip().partition(" ")
        problem: str | None = None
        if kind == "stage":
            stage = payload
        elif kind == "result":
            parsed = _result_payload(payload)
            if isinstance(parsed, str):
                problem = parsed
            else:
                result = parsed
        else:
            problem = f"an unknown kind {kind!r} (known: {', '.join(KINDS)})"
        if problem is not None and error is None:
            error = f"{problem} in the line {_shown(line)}"
    return Output(stage, result, error)
