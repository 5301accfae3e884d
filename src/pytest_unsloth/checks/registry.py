"""Gathering checks: the hook, the ``@pytest_unsloth.check`` decorator, vetoes and selection."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from pytest_unsloth.checks.base import Check, CheckFunc, function_problem

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
    spec = {
        "name": name,
        "description": description,
        "needs_gpu": needs_gpu,
        "isolated": isolated,
        "timeout": timeout,
        "cacheable": cacheable,
    }
    return _declare(name, spec)


def builtin_check(
    name: str,
    *,
    layer: str,
    description: str,
    needs_gpu: bool = False,
    probes: tuple[str, ...] = (),
    depends_on: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """Declare one of the plugin's own checks: ``check``'s spec, marked ``builtin``.

    ``layer`` places it in the run order (``checks.builtin.LAYERS``); ``probes`` start early
    and ``depends_on`` names root causes (see ``Check``). Gathered by ``checks.builtin``, never
    from a conftest that imports the function.
    """
    spec = {
        "name": name,
        "description": description,
        "needs_gpu": needs_gpu,
        "probes": probes,
        "depends_on": depends_on,
        "builtin": True,
        "layer": layer,
    }
    return _declare(name, spec)


def _declare(name: str, spec: dict[str, Any]) -> Callable[[F], F]:
    """The decorator that marks a function with ``spec`` (or leaves a usage error behind)."""
    if callable(name):
        # Bare ``@check``: Python passed the function as the name. Raising here would be a
        # conftest import error with a traceback; the gathering step reports it cleanly.
        func = name
        bad = _Invalid(
            f"@pytest_unsloth.check is used without a name on {_qualname(func)}. Fix: "
            "write @pytest_unsloth.check('my-check')"
        )
        bad.__name__ = getattr(func, "__name__", "check")
        return bad  # type: ignore[return-value]

    def decorate(func: F) -> F:
        problem = function_problem(func)
        if problem:
            bad = _Invalid(f"@pytest_unsloth.check({name!r}) on {_qualname(func)}: {problem}")
            bad.__name__ = getattr(func, "__name__", None) or type(func).__name__
            return bad  # type: ignore[return-value]
        marked = dict(spec)
        if not marked["description"]:
            marked["description"] = (getattr(func, "__doc__", None) or "").strip().split("\n")[0]
        try:
            setattr(func, ATTR, marked)
        except (AttributeError, TypeError):  # e.g. a builtin or a frozen callable
            bad = _Invalid(
                f"@pytest_unsloth.check({name!r}) cannot mark {func!r}; decorate a function "
                "defined with def"
            )
            bad.__name__ = getattr(func, "__name__", None) or type(func).__name__
            return bad  # type: ignore[return-value]
        return func

    return decorate


def _qualname(func: object) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))


class _Invalid:
    """What ``@check`` leaves in place of a wrong declaration: a usage error at gathering."""

    __name__ = "check"

    def __init__(self, error: str) -> None:
        setattr(self, ATTR, {"error": error})

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(getattr(self, ATTR)["error"])


def _adapt(func: Callable[..., Any]) -> CheckFunc:
    """Accept user functions that take no argument as well as ones taking the context."""
    import inspect

    if getattr(func, "_unsloth_adapted", False):
        return func  # signature() would follow __wrapped__ and wrap it twice
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return func
    if len(params) == 0:

        def call(ctx: Any) -> Any:
            return func()

        call.__wrapped__ = func  # type: ignore[attr-defined]
        call._unsloth_adapted = True  # type: ignore[attr-defined]
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
            if not isinstance(spec, dict) or spec.get("builtin"):
                continue  # a built-in check imported into a conftest is not the user's
            source = f"{_plugin_source(config, plugin)}:{getattr(obj, '__name__', '?')}"
            if "error" in spec:
                raise pytest.UsageError(f"pytest-unsloth: {source}: {spec['error']}")
            try:
                found.append(Check(func=_adapt(obj), source=source, **spec))
            except (ValueError, TypeError) as exc:
                raise pytest.UsageError(
                    f"pytest-unsloth: {exc}. Fix: correct the @pytest_unsloth.check(...) "
                    f"arguments in {source}."
                ) from None
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

    def _index(self, name: object, method: str) -> int:
        if not isinstance(name, str):
            raise pytest.UsageError(
                f"checks.{method}({name!r}): the first argument must be a check name (a string); "
                f"known: {', '.join(self.names())}"
            )
        for i, c in enumerate(self._checks):
            if c.name == name:
                return i
        import difflib

        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise pytest.UsageError(
            f"checks.{method}({name!r}): no check is named {name!r}; {hint}known: "
            f"{', '.join(self.names())}"
        )

    def disable(self, name: str, reason: str) -> None:
        """Keep the item but skip it with ``reason`` (reported in the summary and JSON)."""
        i = self._index(name, "disable")
        if not isinstance(reason, str) or not reason.strip():
            raise pytest.UsageError(
                f"checks.disable({name!r}, {reason!r}): the reason must be a non-empty string "
                "(it is shown as the skip reason)"
            )
        self._checks[i] = dataclasses.replace(self._checks[i], disabled=reason)

    def remove(self, name: str) -> None:
        """Drop a check entirely."""
        del self._checks[self._index(name, "remove")]

    def replace(self, new: Check) -> None:
        """Swap in a changed check of the same name."""
        _require_check(new, "checks.replace")
        self._checks[self._index(new.name, "replace")] = new

    def add(self, new: Check) -> None:
        """Append a check (name clashes are a usage error)."""
        _require_check(new, "checks.add")
        if new.name in self:
            other = self[new.name]
            raise pytest.UsageError(_clash(new, other))
        self._checks.append(new)


def _require_check(obj: object, what: str) -> None:
    if not isinstance(obj, Check):
        raise pytest.UsageError(
            f"{what}({obj!r:.80}): expected a pytest_unsloth.Check, got {type(obj).__name__} "
            "(build one with pytest_unsloth.Check(name, func) or "
            "dataclasses.replace(checks[name], ...))"
        )


def _clash(a: Check, b: Check) -> str:
    return (
        f"pytest-unsloth: two checks are named {a.name!r}: one from {b.source}, one from "
        f"{a.source}. Fix: rename one of them."
    )


def _hook_source(config: pytest.Config, impl: Any) -> str:
    plugin = getattr(impl, "plugin", None)
    return _plugin_source(config, plugin) if plugin is not None else "a plugin"


def _call_hook(config: pytest.Config, name: str, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    """Call each implementation of one of our hooks alone, so an error names its file.

    A user's hook that raises, or a veto that names an unknown check, becomes a usage error
    naming the hook and the file instead of an INTERNALERROR.
    """
    caller = getattr(config.hook, name)
    impls = list(caller.get_hookimpls())
    if any(getattr(i, "hookwrapper", False) or getattr(i, "wrapper", False) for i in impls):
        # Wrappers need pluggy's machinery; call the hook as a whole (no per-file blame).
        impls = []
        calls: list[tuple[str, Callable[[], Any]]] = [
            (name, lambda: caller(**kwargs)),
        ]
    else:
        # pluggy calls the last registered implementation first.
        calls = [
            (
                f"{name} in {_hook_source(config, impl)}",
                _bind(impl.function, {a: kwargs[a] for a in impl.argnames if a in kwargs}),
            )
            for impl in reversed(impls)
        ]
    results: list[tuple[str, Any]] = []
    for where, call in calls:
        try:
            results.append((where, call()))
        except pytest.UsageError as exc:
            message = str(exc)
            if not message.startswith("pytest-unsloth:"):
                message = f"pytest-unsloth: {where}: {message}"
            raise pytest.UsageError(
                message + ("" if "Fix:" in message else f". Fix: correct {where}.")
            ) from None
        except Exception as exc:
            raise pytest.UsageError(
                f"pytest-unsloth: {where} raised {type(exc).__name__}: {exc}. Fix: correct "
                "that hook (it runs before any check does)."
            ) from None
    return results


def _bind(func: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[[], Any]:
    return lambda: func(**kwargs)


def _contributed(where: str, result: object) -> list[Check]:
    """The checks one ``pytest_unsloth_checks`` implementation returned, validated."""
    if result is None:
        return []
    if isinstance(result, Check):
        raise pytest.UsageError(
            f"pytest-unsloth: {where} returned one Check ({result.name!r}), not a list. "
            f"Fix: return [check]."
        )
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise pytest.UsageError(
            f"pytest-unsloth: {where} returned {type(result).__name__} {result!r:.80}. "
            "Fix: return a list of pytest_unsloth.Check objects (or None)."
        )
    try:
        items = list(result)
    except Exception as exc:
        raise pytest.UsageError(
            f"pytest-unsloth: {where}: iterating its result raised {type(exc).__name__}: "
            f"{exc}. Fix: return a list of pytest_unsloth.Check objects."
        ) from None
    for i, c in enumerate(items):
        if not isinstance(c, Check):
            raise pytest.UsageError(
                f"pytest-unsloth: {where} returned a list whose item {i} is "
                f"{type(c).__name__} {c!r:.80}. Fix: return a list of pytest_unsloth.Check "
                "objects only."
            )
    return items


def gather(config: pytest.Config) -> CheckList:
    """All checks after the modify hook, in order, names unique (else a usage error)."""
    checks = CheckList([])
    for where, contributed in _call_hook(config, "pytest_unsloth_checks", {"config": config}):
        for c in _contributed(where, contributed):
            checks.add(c)
    for c in decorated_checks(config):
        checks.add(c)
    _call_hook(config, "pytest_unsloth_modify_checks", {"config": config, "checks": checks})
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
