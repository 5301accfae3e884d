"""Child side of the ``--unsloth-env`` GRPO checks: ``python -m pytest_unsloth.grpo.child NAME``.

The GRPO checks run the user's code (reward functions, their module's import, chat templates,
GRPOConfig with the user's values). Here a ``sys.exit()``, ``os._exit()``, a segfault, an endless
loop or a memory blow-up ends this child, never pytest: the parent (``run_subprocess``) kills it
at its timeout and reports the stage it reached, which names the reward function it was in.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_unsloth.probes import emit, stage

if TYPE_CHECKING:
    from pytest_unsloth.settings import Settings


def encode_settings(settings: Settings) -> str:
    """The settings (sources included) as one argv-safe string."""
    # Read-only mappings (grpo_config, fit_settings, sources) do not pickle: plain dicts do.
    mappings: dict[str, Any] = {
        f.name: dict(value)
        for f in dataclasses.fields(settings)
        if isinstance(value := getattr(settings, f.name), Mapping)
    }
    plain = dataclasses.replace(settings, **mappings)
    return base64.b64encode(pickle.dumps(plain)).decode("ascii")


def _decode_settings(text: str) -> Settings:
    value: Settings = pickle.loads(base64.b64decode(text))  # written by our own parent
    return value


def _exit_with_parent() -> None:
    """End this child when pytest goes away (a Ctrl-C there), even inside an endless loop."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="unsloth-parent-watch", daemon=True).start()


def main(argv: list[str]) -> dict[str, Any]:
    """Run one GRPO check body; report passed, failed (found/why/fix), skipped or error."""
    from pytest_unsloth.checks import grpo as grpo_checks
    from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
    from pytest_unsloth.grpo import rewards

    _exit_with_parent()
    name, rootpath, payload = argv
    body = grpo_checks.CHILD_BODIES[name]
    rewards.stage_hook = stage
    ctx = CheckContext(_decode_settings(payload), Path(rootpath))
    stage(f"run the {name} check")
    try:
        detail = body(ctx)
    except CheckFailed as exc:
        return emit("failed", exc.found, found=exc.found, why=exc.why, fix=exc.fix)
    except CheckSkipped as exc:
        return emit("skipped", str(exc))
    except BaseException as exc:  # a bug in the check itself, shown with its traceback
        tb = traceback.format_exc()
        return emit("error", f"{type(exc).__name__}: {exc}", traceback=tb[-4000:])
    return emit("passed", str(detail) if detail else "ok")


if __name__ == "__main__":
    from pytest_unsloth.probes import run

    sys.exit(run("grpo", {"grpo": lambda: main(sys.argv[1:])}))
