"""``unsloth-env::NAME`` items: one pytest item per check, with a three-line failure report."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_unsloth.checks.base import (
    Check,
    CheckContext,
    CheckFailed,
    CheckSkipped,
    bad_return,
)

if TYPE_CHECKING:
    from pytest_unsloth.probe import ProbeResult

PREFIX = "unsloth-env"
PROPERTY = "unsloth_check"
CONTEXT_KEY = pytest.StashKey[CheckContext]()
OUR_DIR = str(Path(__file__).resolve().parent.parent)  # the package, not just checks/


def get_context(config: pytest.Config) -> CheckContext:
    """The session's shared check context."""
    ctx = config.stash.get(CONTEXT_KEY, None)
    if ctx is None:
        from pytest_unsloth.settings import get_settings

        ctx = CheckContext(get_settings(config), config.rootpath, config)
        config.stash[CONTEXT_KEY] = ctx
    return ctx


class CheckError(Exception):
    """A check raised something other than the documented failure (a bug in the check)."""


class EnvCollector(pytest.Collector):
    """The ``unsloth-env`` node that parents every check item."""

    def collect(self) -> list[pytest.Item]:  # pragma: no cover - items are made directly
        return []


class CheckItem(pytest.Item):
    """One environment check as a pytest item."""

    def __init__(self, *, check: Check, order: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        self.order = order
        self._isolated_runs: list[dict[str, Any]] = []
        self.add_marker(pytest.mark.unsloth_env)

    def _record(self, status: str, start: float, **fields: Any) -> None:
        record = {
            "name": self.check.name,
            "order": self.order,
            "status": status,
            "duration": round(time.perf_counter() - start, 4),
            "source": self.check.source,
            "description": self.check.description,
            **fields,
        }
        probes = self._probe_records()
        if probes:
            record["probes"] = probes
        self.user_properties.append((PROPERTY, json.dumps(record, default=str)))

    def _probe_records(self) -> list[dict[str, Any]]:
        if not self.check.probes:
            return list(self._isolated_runs)
        from pytest_unsloth.probe import get_probe_store

        done = get_probe_store(self.config).results()
        done.update(get_context(self.config).combined)
        out = []
        for name in self.check.probes:
            r = done.get(name)
            if r is not None:
                rec = {
                    "name": name,
                    "status": r.status,
                    "origin": r.origin,
                    "age_s": r.age_s,
                    "duration": round(r.duration, 3),
                    "stage": r.stage,
                }
                if "gpus" in r.data:
                    rec["gpus"] = r.data["gpus"]
                out.append(rec)
        return out

    def setup(self) -> None:
        """Start every probe the selected checks need, concurrently, before the first waits."""

        wanted = self.config.stash.get(PROBES_WANTED_KEY, ())
        needs_probes = self.check.probes and not self.check.disabled
        if wanted and needs_probes:
            get_context(self.config).start_probes(wanted)

    def runtest(self) -> None:
        """Run the check; CheckFailed fails with three lines, CheckSkipped skips."""
        start = time.perf_counter()
        chk = self.check
        if chk.disabled:
            self._record("skipped", start, message=f"disabled: {chk.disabled}")
            pytest.skip(f"disabled: {chk.disabled}")
        try:
            ctx = get_context(self.config)
            self._defer_to_root_cause(ctx)
            if chk.needs_gpu and not chk.builtin:
                # Built-in GPU checks diagnose a missing GPU themselves; others skip (or fail
                # under --unsloth-require-gpu) with NVML's reason.
                from pytest_unsloth.checks.cuda import visible_gpus

                visible_gpus(ctx)
            run = chk.func if not chk.isolated else self._run_isolated
            if chk.builtin:
                from pytest_unsloth.offline import hub_offline
                from pytest_unsloth.scratch import torch_caches

                # Built-in checks load tokenizers and configs: never from the Hub unless
                # allowed, and torch's cache folders not in $TMPDIR. Users' own checks keep
                # the user's settings.
                with hub_offline(ctx.settings.allow_download), torch_caches(self.config):
                    detail = run(ctx)
            else:
                detail = run(ctx)
            problem = bad_return(detail)
            if problem:
                # False or a dict would otherwise read as a pass: say what the check did.
                raise CheckError(f"check {chk.name!r} ({chk.source}) {problem}")
        except CheckFailed as exc:
            self._record(
                "failed", start, message=exc.found, found=exc.found, why=exc.why, fix=exc.fix
            )
            raise
        except CheckSkipped as exc:
            self._record("skipped", start, message=str(exc))
            pytest.skip(str(exc))
        except pytest.skip.Exception as exc:
            self._record("skipped", start, message=str(exc.msg))
            raise
        except Exception as exc:
            self._record("error", start, message=f"{type(exc).__name__}: {exc}")
            raise
        self._record("passed", start, message=str(detail) if detail else "ok")

    def _defer_to_root_cause(self, ctx: CheckContext) -> None:
        """Skip with "see unsloth-env::OWNER" while a root cause another selected check reports
        holds, so one cause is reported once (xdist workers each derive the same verdict)."""
        selected = self.config.stash.get(SELECTED_KEY, frozenset())
        for cause in self.check.depends_on:
            owner, found = ctx.root_cause(cause)
            if found is not None and owner != self.check.name and owner in selected:
                raise CheckSkipped(f"see {PREFIX}::{owner}: {found}")

    def _run_isolated(self, ctx: CheckContext) -> str | None:
        return run_isolated(self.check, ctx, self._isolated_runs)

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None
    ) -> str | Any:
        """Three lines for a check failure; the check's own traceback for a crash."""
        if isinstance(excinfo.value, CheckFailed):
            return excinfo.value.render()
        if isinstance(excinfo.value, CheckError):
            return str(excinfo.value)
        # A crash in user code: show the user's frames, not ours.
        if not self.check.builtin:
            tb = excinfo.traceback.filter(lambda e: not str(e.path).startswith(OUR_DIR))
            if tb:
                excinfo.traceback = tb
            return (
                f"check {self.check.name!r} ({self.check.source}) raised instead of "
                f"passing, failing or skipping:\n"
                + str(excinfo.getrepr(style="short", chain=False))
            )
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        """Location shown in reports: the check's node id."""
        return self.path, None, f"{PREFIX}::{self.name}"


PROBES_WANTED_KEY = pytest.StashKey[tuple[str, ...]]()
# Names of the check items this session runs (after -k / --unsloth-checks selection).
SELECTED_KEY = pytest.StashKey[frozenset[str]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Point a check's skip at ``unsloth-env::NAME`` instead of the line inside the plugin."""
    rep = yield
    if isinstance(item, CheckItem) and rep.skipped and isinstance(rep.longrepr, tuple):
        reason = rep.longrepr[2]
        rep.longrepr = (str(item.path / f"{PREFIX}::{item.name}"), None, reason)
    return rep


def make_items(session: pytest.Session, checks: list[Check]) -> list[CheckItem]:
    """One item per check under the ``unsloth-env`` collector."""
    parent = EnvCollector.from_parent(session, name=PREFIX, nodeid=PREFIX)
    return [
        CheckItem.from_parent(parent, name=c.name, check=c, order=i) for i, c in enumerate(checks)
    ]


# ----------------------------------------------------------------------------------------------
# Isolated checks: the user's function re-imported and run in a subprocess with a timeout.


def _function_ref(func: Any) -> dict[str, str]:
    # The function's own globals name its file: two conftest.py files share the module name
    # "conftest", and sys.modules holds only the last one imported.
    file = getattr(func, "__globals__", {}).get("__file__")
    if not file:
        module = sys.modules.get(getattr(func, "__module__", ""), None)
        file = getattr(module, "__file__", None)
    if not file:
        raise CheckError(
            f"isolated check function {func!r} has no importable module file; define it at "
            "module level in a conftest.py or plugin module"
        )
    return {"file": str(file), "module": func.__module__, "qualname": func.__qualname__}


def _file_stamp(path: str) -> str:
    """Size and mtime of the check's source file: editing it invalidates a cached result."""
    try:
        st = Path(path).stat()
    except OSError:
        return "0"
    return f"{st.st_size:x}{st.st_mtime_ns:x}"


def _run_or_reuse(
    chk: Check, ctx: CheckContext, argv: list[str], timeout: float, file: str
) -> ProbeResult:
    """Run the child, or reuse a passing result of ``cacheable`` checks (probe-cache rules)."""
    from pytest_unsloth.probe import run_subprocess

    cache = ctx.probes.cache if chk.cacheable and ctx.config is not None else None
    if cache is None:
        return run_subprocess(argv, chk.name, timeout)
    key = f"check-{chk.name}-{_file_stamp(file)}"
    with cache.lock(key):
        res = cache.lookup(key)
        if res is None:
            res = run_subprocess(argv, key, timeout)
            cache.store(res)
    cache.warn_pending()
    return res


def run_isolated(
    chk: Check, ctx: CheckContext, runs: list[dict[str, Any]] | None = None
) -> str | None:
    """Run ``chk`` in a child interpreter; a hang or crash fails only this check."""
    from pytest_unsloth.checks.registry import original_function

    ref = _function_ref(original_function(chk))
    spec = {**ref, "rootpath": str(ctx.rootpath), "settings": _settings_json(ctx.settings)}
    timeout = chk.timeout or ctx.settings.probe_timeout
    argv = [sys.executable, "-m", "pytest_unsloth.checks.isolated", json.dumps(spec)]
    res = _run_or_reuse(chk, ctx, argv, timeout, ref["file"])
    if runs is not None:
        runs.append(
            {
                "name": chk.name,
                "kind": "isolated",
                "status": res.status,
                "origin": res.origin,
                "age_s": res.age_s,
                "duration": round(res.duration, 3),
                "stage": res.stage,
            }
        )
    data = res.data
    if res.status == "passed":
        return res.message or None
    if res.status == "skipped":
        raise CheckSkipped(res.message)
    if res.status == "failed" and "found" in data:
        raise CheckFailed(str(data["found"]), str(data.get("why", "")), str(data.get("fix", "")))
    if res.status == "error":
        raise CheckError(
            f"check {chk.name!r} ({chk.source}) raised instead of passing, failing or skipping "
            f"(in its isolated subprocess):\n{data.get('traceback', res.message)}"
        )
    from pytest_unsloth.probe import stderr_summary

    note = stderr_summary(res.stderr_tail)
    raise CheckFailed(
        f"isolated check {res.message}" + (f"; stderr: {note}" if note else ""),
        "a check that hangs or crashes here would hang or crash the training job the same way",
        f"run the check's function ({chk.source}) by hand to see where it stops",
    )


def _settings_json(settings: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(settings):
        if f.name == "sources":
            continue
        value = getattr(settings, f.name)
        out[f.name] = dict(value) if isinstance(value, Mapping) else value
    return json.loads(json.dumps(out, default=str))  # type: ignore[no-any-return]
