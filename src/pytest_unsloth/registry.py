"""Gathering checks: the hook, the ``@pytest_unsloth.check`` decorator, vetoes and selection."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from pytest_unsloth.checks.base import Check, CheckFunc

F = TypeVar("F", bound=Callable[..., Any])
ATTR = "__unsloth_check__"


def check(
    name: str,
    *,
    description: str = "",
    needs_gpu: bool = False,
    isolated: bool = False,
    timeout: float | None = None,
    cacheable: bool = False,
) -> Callable[[F], F]:
    """Declare a function in a conftest.py or plugin module as an ``unsloth-env::NAME`` check.

    The function takes no argument or one (the ``CheckContext``). It returns normally to pass
    (a returned string is shown as the detail), raises ``pytest_unsloth.CheckFailed(found, why,
    fix)`` to fail, and calls ``pytest.skip(reason)`` (or raises ``CheckSkipped``) to skip.
    With ``isolated=True`` it runs in a subprocess limited to ``timeout`` seconds.
    """

    def decorate(func: F) -> F:
        setattr(
            func,
            ATTR,
            {
                "name": name,
                "description": description or (func.__doc__ or "").strip().split("\n")[0],
                "needs_gpu": needs_gpu,
                "isolated": isolated,
                "timeout": timeout,
                "cacheable": cacheable,
            },
        )
        return func

    return decorate


def _adapt(func: Callable[..., Any]) -> CheckFunc:
    """Accept user functions that take no argument as well as ones taking the context."""
    import inspect

    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return func
    if len(params) == 0:

        def call(ctx: Any) -> Any:
            return func()

        call.__wrapped__ = func  # type: ignore[attr-defined]
        return call
    return func


def _plugin_source(config: pytest.Config, plugin: object) -> str:
    name = config.pluginmanager.get_name(plugin) or ""
    path = getattr(plugin, "__file__", None)
    if path:
        try:
            from pathlib import Path

            return str(Path(path).resolve().relative_to(config.rootpath))
        except ValueError:
            return str(path)
    return name or repr(plugin)


def decorated_checks(config: pytest.Config) -> list[Check]:
    """Checks declared with ``@pytest_unsloth.check`` in registered modules (conftests, plugins)."""
    found: list[Check] = []
    for plugin in config.pluginmanager.get_plugins():
        namespace = getattr(plugin, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for obj in list(namespace.values()):
            spec = getattr(obj, ATTR, None) if callable(obj) else None
            if not isinstance(spec, dict):
                continue
            source = f"{_plugin_source(config, plugin)}:{getattr(obj, '__name__', '?')}"
            try:
                found.append(Check(func=_adapt(obj), source=source, **spec))
            except ValueError as exc:
                raise pytest.UsageError(f"pytest-unsloth: {exc}") from None
    return found


def original_function(chk: Check) -> Any:
    """The user's function behind a check (what an isolated run re-imports in the child)."""
    return getattr(chk.func, "__wrapped__", chk.func)


class CheckList:
    """The ordered checks that will become items; what ``pytest_unsloth_modify_checks`` edits."""

    def __init__(self, checks: list[Check]) -> None:
        self._checks = list(checks)

    def __iter__(self) -> Iterator[Check]:
        return iter(list(self._checks))

    def __len__(self) -> int:
        return len(self._checks)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self._checks)

    def __getitem__(self, name: str) -> Check:
        for c in self._checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; known: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Check names in order."""
        return [c.name for c in self._checks]

    def _index(self, name: str) -> int:
        for i, c in enumerate(self._checks):
            if c.name == name:
                return i
        raise KeyError(f"no check named {name!r}; known: {', '.join(self.names())}")

    def disable(self, name: str, reason: str) -> None:
        """Keep the item but skip it with ``reason`` (reported in the summary and JSON)."""
        i = self._index(name)
        self._checks[i] = dataclasses.replace(self._checks[i], disabled=reason)

    def remove(self, name: str) -> None:
        """Drop a check entirely."""
        del self._checks[self._index(name)]

    def replace(self, new: Check) -> None:
        """Swap in a changed check of the same name."""
        self._checks[self._index(new.name)] = new

    def add(self, new: Check) -> None:
        """Append a check (name clashes are a usage error)."""
        if new.name in self:
            other = self[new.name]
            raise pytest.UsageError(_clash(new, other))
        self._checks.append(new)


def _clash(a: Check, b: Check) -> str:
    return (
        f"pytest-unsloth: two checks are named {a.name!r}: one from {b.source}, one from "
        f"{a.source}. Fix: rename one of them."
    )


def gather(config: pytest.Config) -> CheckList:
    """All checks after the modify hook, in order, names unique (else a usage error)."""
    checks = CheckList([])
    for contributed in config.hook.pytest_unsloth_checks(config=config):
        for c in contributed or ():
            if not isinstance(c, Check):
                raise pytest.UsageError(
                    f"pytest-unsloth: pytest_unsloth_checks returned {c!r}; it must return a list "
                    "of pytest_unsloth.Check objects"
                )
            checks.add(c)
    for c in decorated_checks(config):
        checks.add(c)
    config.hook.pytest_unsloth_modify_checks(config=config, checks=checks)
    return checks


def select(checks: CheckList, selection: tuple[str, ...], source: str) -> list[Check]:
    """Apply ``unsloth_checks``: names keep only those, ``-NAME`` leaves one out."""
    names = checks.names()
    unknown = [w.lstrip("-") for w in selection if w.lstrip("-") not in names]
    if unknown:
        raise pytest.UsageError(
            f"pytest-unsloth: {source} names unknown check(s) {', '.join(map(repr, unknown))}. "
            f"Fix: use names from: {', '.join(names)}."
        )
    include = [w for w in selection if not w.startswith("-")]
    exclude = {w[1:] for w in selection if w.startswith("-")}
    return [c for c in checks if (not include or c.name in include) and c.name not in exclude]
