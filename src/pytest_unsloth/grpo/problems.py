"""Structured findings shared by the GRPO setup checks: what was found, why it matters, the fix."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pytest_unsloth.util.readable import ReadableRepr

Severity = Literal["error", "warning", "info"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding, written so a check failure can print three short lines."""

    code: str
    found: str
    why: str
    fix: str
    severity: Severity = "error"

    def format(self, indent: str = "") -> str:
        """Render the finding as found / why / fix lines."""
        return f"{indent}found: {self.found}\n{indent}why:   {self.why}\n{indent}fix:   {self.fix}"


class ReportText(ReadableRepr):
    """``format()`` and ``str()`` for reports that have ``summary()`` and ``problems``."""

    problems: tuple[Problem, ...]

    def summary(self) -> str:  # pragma: no cover - every report defines it
        raise NotImplementedError

    def format(self) -> str:
        """Render the summary and every finding."""
        lines = [self.summary()]
        for p in self.problems:
            lines += [f"  [{p.severity}] {p.code}", p.format("    ")]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def errors(problems: tuple[Problem, ...] | list[Problem]) -> list[Problem]:
    """Return the problems that make a check fail."""
    return [p for p in problems if p.severity == "error"]


def shorten(value: object, limit: int = 80) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def installed_version(dist: str) -> str | None:
    """Return the installed version of a distribution, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
