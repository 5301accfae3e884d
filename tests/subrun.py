"""Subprocess runs in the plugin's tests: a fresh interpreter with a time limit, whole output."""

from __future__ import annotations

import subprocess
import sys

import pytest


def output(result: pytest.RunResult) -> str:
    """Everything a run printed: stdout, then stderr."""
    return result.stdout.str() + "\n" + result.stderr.str()


def run_pytest(
    pytester: pytest.Pytester, *args: str, timeout: float
) -> tuple[pytest.RunResult, str]:
    """Run pytest in a subprocess (killed after ``timeout`` s); it must not INTERNALERROR.

    Returns the result and its whole output (``output``).
    """
    result = pytester.runpytest_subprocess(*args, timeout=timeout)
    out = output(result)
    assert "INTERNALERROR" not in out, out
    return result, out


def fit_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m pytest_unsloth.fit ARGS`` in a fresh interpreter, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pytest_unsloth.fit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
