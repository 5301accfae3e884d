"""pytest runs inside the plugin's tests: a fresh interpreter with a time limit, whole output."""

from __future__ import annotations

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
