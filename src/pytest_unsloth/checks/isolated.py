"""Isolated checks: the check's function re-imported and run in a child interpreter.

The parent side (``run_isolated``) starts ``python -m pytest_unsloth.checks.isolated SPEC_JSON``
with a time limit, and ``replay`` turns what a check's child reported into the check's own pass,
skip or failure (the GRPO checks' children use it too). The child side (``main``) imports the
function from the very file it was defined in and reports its outcome on the probe protocol.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_unsloth.checks.base import CheckError, CheckFailed, CheckSkipped
from pytest_unsloth.probes import emit, stage

if TYPE_CHECKING:
    from pytest_unsloth.checks.base import Check, CheckContext
    from pytest_unsloth.probes.protocol import ProbeResult

# ----------------------------------------------------------------------------------------------
# Parent side


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
    from pytest_unsloth.probes.runner import run_subprocess

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
    raised = (
        f"check {chk.name!r} ({chk.source}) raised instead of passing, failing or skipping "
        "(in its isolated subprocess)"
    )
    return replay(res, raised, lambda: _died(chk, res))


def _died(chk: Check, res: ProbeResult) -> CheckFailed:
    """The failure of an isolated check whose child hung or crashed."""
    from pytest_unsloth.probes.runner import stderr_summary

    note = stderr_summary(res.stderr_tail)
    return CheckFailed(
        f"isolated check {res.message}" + (f"; stderr: {note}" if note else ""),
        "a check that hangs or crashes here would hang or crash the training job the same way",
        f"run the check's function ({chk.source}) by hand to see where it stops",
    )


def replay(res: ProbeResult, raised: str, died: Callable[[], CheckFailed]) -> str | None:
    """A check's outcome as its child reported it: the pass detail, or the skip, failure or error
    raised here. ``raised`` opens the error of a check that raised; ``died()`` is the failure of
    a child that hung, crashed or exited without reporting."""
    data = res.data
    if res.status == "passed":
        return res.message or None
    if res.status == "skipped":
        raise CheckSkipped(res.message)
    if res.status == "failed" and "found" in data:
        raise CheckFailed(str(data["found"]), str(data.get("why", "")), str(data.get("fix", "")))
    if res.status == "error":
        raise CheckError(f"{raised}:\n{data.get('traceback', res.message)}")
    raise died()


def _settings_json(settings: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(settings):
        if f.name == "sources":
            continue
        value = getattr(settings, f.name)
        out[f.name] = dict(value) if isinstance(value, Mapping) else value
    return json.loads(json.dumps(out, default=str))  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------------
# Child side: python -m pytest_unsloth.checks.isolated SPEC_JSON


def _same_file(module: Any, file: Path) -> bool:
    try:
        return Path(module.__file__).resolve() == file.resolve()
    except (AttributeError, TypeError, OSError):
        return False


def _load(spec: dict[str, Any]) -> Any:
    """The check function, from the very file it was defined in (identified by path)."""
    file = Path(spec["file"])
    module = sys.modules.get(spec["module"])
    if module is not None and not _same_file(module, file):
        module = None
    if module is None and file.name != "conftest.py":
        # conftest.py files share one module name; importing "conftest" by name would run
        # whichever comes first on sys.path, so those are always loaded from their file.
        try:
            module = importlib.import_module(spec["module"])
        except ImportError:
            module = None
        if module is not None and not _same_file(module, file):
            module = None
    if module is None:
        sys.path.insert(0, str(file.parent))
        loader_spec = importlib.util.spec_from_file_location(spec["module"], file)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot import {file}") from None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[spec["module"]] = module
        loader_spec.loader.exec_module(module)
    obj: Any = module
    for part in spec["qualname"].split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str]) -> dict[str, Any]:
    """Import and run one check function; report pass, fail, skip or error."""
    import pytest

    from pytest_unsloth.checks.base import CheckContext, bad_return
    from pytest_unsloth.checks.registry import _adapt
    from pytest_unsloth.settings import Settings

    spec = json.loads(argv[0])
    sys.path.insert(0, spec["rootpath"])
    stage("import the check")
    func = _load(spec)
    target = getattr(func, "__wrapped__", func)
    raw: dict[str, Any] = spec["settings"]
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    settings = Settings(**values)
    ctx = CheckContext(settings, Path(spec["rootpath"]))
    stage("run the check")
    try:
        detail = _adapt(target)(ctx)
    except CheckFailed as exc:
        return emit("failed", exc.found, found=exc.found, why=exc.why, fix=exc.fix)
    except CheckSkipped as exc:
        return emit("skipped", str(exc))
    except pytest.skip.Exception as exc:
        return emit("skipped", str(exc.msg))
    except Exception as exc:
        tb = traceback.format_exc()
        return emit("error", f"{type(exc).__name__}: {exc}", traceback=tb[-4000:])
    problem = bad_return(detail)
    if problem:
        return emit("error", problem, traceback=problem)
    return emit("passed", str(detail) if detail else "ok")


if __name__ == "__main__":
    from pytest_unsloth.probes import run

    raise SystemExit(run("isolated", {"isolated": lambda: main(sys.argv[1:])}))
