"""Child side of an isolated check: ``python -m pytest_unsloth.checks.isolated SPEC_JSON``."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from pytest_unsloth.probes import emit, stage


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

    from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped, bad_return
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
