"""``unsloth-env::NAME`` items: one pytest item per check, with a three-line failure report.

An item attaches its check's record to its report (``user_properties``), so the table and the
JSON report, written by the xdist controller, see every worker's checks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_unsloth.checks.base import (
    Check,
    CheckContext,
    CheckError,
    CheckFailed,
    CheckSkipped,
    bad_return,
)

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
        from pytest_unsloth.probes.runner import get_probe_store

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
                from pytest_unsloth.util.offline import hub_offline
                from pytest_unsloth.util.scratch import torch_caches

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
        from pytest_unsloth.checks.isolated import run_isolated

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
