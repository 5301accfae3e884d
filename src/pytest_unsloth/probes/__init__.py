"""The probes: runner.py starts children, cache.py keeps results between runs, table.py lists
the kernel probes, protocol.py is the line protocol both sides speak.

This module is the child side (``python -m pytest_unsloth.probes NAME`` and the isolated-check
children): each probe imports the heavy packages it checks, reports the stage it is in on
stdout and ends with one result line, so the parent can tell where a hung or crashed child was.
The parent imports this package too, so it stays standard library only.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

from pytest_unsloth.probes.protocol import MARK, Status, result_line, stage_line, write_line

__all__ = ["MARK", "emit", "run", "stage"]

_current_stage: list[str] = []


def stage(name: str) -> None:
    """Announce the stage the probe is entering."""
    _current_stage[:] = [name]
    write_line(stage_line(name))


def emit(status: Status, message: str, **data: Any) -> dict[str, Any]:
    """Build a result payload."""
    return {"status": status, "message": message, "data": data}


def run(name: str, probes: dict[str, Callable[[], dict[str, Any]]]) -> int:
    """Run one probe and print its result line; exceptions become a failed result."""
    func = probes.get(name)
    if func is None:
        result = emit("failed", f"unknown probe {name!r}; known: {', '.join(sorted(probes))}")
    else:
        try:
            result = func()
        except BaseException as exc:  # report, never let the traceback be the only output
            where = _current_stage[0] if _current_stage else "start"
            tb = traceback.format_exc(limit=-6)
            sys.stderr.write(tb)
            result = emit("failed", f"{type(exc).__name__}: {exc}".strip(), traceback=tb[-3000:])
            result["stage"] = where
    if _current_stage and "stage" not in result:
        result["stage"] = _current_stage[0]
    write_line(result_line(result))
    return 0
