"""Helpers shared by the GRPO setup checks' reports (each finding is a ``findings.Finding``)."""

from __future__ import annotations

from pytest_unsloth.findings import Finding, Severity
from pytest_unsloth.util.readable import ReadableRepr

# The GRPO checks' name for a finding, kept for code that imports it from pytest_unsloth.grpo.
Problem = Finding

__all__ = ["Finding", "Problem", "ReportText", "Severity", "errors", "installed_version", "shorten"]


class ReportText(ReadableRepr):
    """``format()`` and ``str()`` for reports that have ``summary()`` and ``problems``."""

    problems: tuple[Finding, ...]

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


def errors(problems: tuple[Finding, ...] | list[Finding]) -> list[Finding]:
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
