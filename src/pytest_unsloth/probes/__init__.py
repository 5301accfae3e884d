"""Child side of the probes: run as ``python -m pytest_unsloth.probes NAME``.

Each probe imports the heavy packages it checks, reports the stage it is in on stdout
(``@@unsloth-probe stage NAME``) and ends with one ``@@unsloth-probe result {json}`` line, so the
parent can tell where a hung or crashed child was.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

MARK = "@@unsloth-probe"

_current_stage: list[str] = []


def stage(name: str) -> None:
    """Announce the stage the probe is entering."""
    _current_stage[:] = [name]
    sys.stdout.write(f"\n{MARK} stage {name}\n")
    sys.stdout.flush()


def emit(status: str, message: str, **data: Any) -> dict[str, Any]:
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
    sys.stdout.write(f"\n{MARK} result {json.dumps(result, default=str)}\n")
    sys.stdout.flush()
    return 0
