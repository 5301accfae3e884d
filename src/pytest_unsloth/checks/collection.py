"""What ``--unsloth-env`` adds to collection: the check items, and nothing else in checks-only mode.

``EnvCollection`` is a plugin object that ``plugin.py`` registers only when the flag is given
(as pytest-mypy and pytest's cacheprovider do), so a plain run pays no hook call for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_unsloth.checks.items import PROBES_WANTED_KEY, SELECTED_KEY, CheckItem, make_items
from pytest_unsloth.checks.registry import gather, select

if TYPE_CHECKING:
    from pytest_unsloth.settings import Settings


class EnvCollection:
    """Puts one ``unsloth-env::NAME`` item per selected check before the user's tests."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings

    def _checks_only(self) -> bool:
        """``--unsloth-env`` without test paths on the command line runs the checks alone."""
        return self.config.args_source != pytest.Config.ArgsSource.ARGS

    def pytest_ignore_collect(self, collection_path: Path) -> bool | None:
        """In checks-only mode, collect no test files (nothing of the user's is imported)."""
        return True if self._checks_only() else None

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, items: list[pytest.Item]
    ) -> None:
        """Put the selected checks' items first."""
        checks = select(gather(self.config), self.settings.checks, self.settings.source("checks"))
        items[:0] = make_items(session, checks)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Remember which probes the remaining check items need, to start them together."""
        wanted: dict[str, None] = {}
        selected: set[str] = set()
        for item in session.items:
            if isinstance(item, CheckItem) and not item.check.disabled:
                wanted.update(dict.fromkeys(item.check.probes))
                selected.add(item.check.name)
        self.config.stash[PROBES_WANTED_KEY] = tuple(wanted)
        self.config.stash[SELECTED_KEY] = frozenset(selected)
