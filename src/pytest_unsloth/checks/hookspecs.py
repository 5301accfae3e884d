"""Hook specifications through which conftest files and plugins add or change checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_unsloth.checks.base import Check
    from pytest_unsloth.checks.registry import CheckList


@pytest.hookspec
def pytest_unsloth_checks(config: pytest.Config) -> list[Check] | None:
    """Return checks to add to ``pytest --unsloth-env`` (a list of ``pytest_unsloth.Check``).

    Every implementation is called; their lists are concatenated. The built-in checks come
    through this hook too. A name used twice is a usage error naming both sources.
    """


@pytest.hookspec
def pytest_unsloth_modify_checks(config: pytest.Config, checks: CheckList) -> None:
    """Veto or change checks before items are made.

    ``checks.disable(name, reason)`` turns a check into a skip that reports the reason;
    ``checks.remove(name)`` drops it; ``checks.replace(check)`` swaps in a changed copy
    (``dataclasses.replace(checks[name], timeout=60)``).
    """
