"""Checks that a kernel really loads and runs, one probe subprocess each.

Each check is built from its probe's row in ``probes/table.py`` (distribution, why, fix).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.install import install_keeping_torch
from pytest_unsloth.probes.runner import stderr_summary
from pytest_unsloth.probes.table import PROBES_BY_NAME

if TYPE_CHECKING:
    from pytest_unsloth.compat.shadow import Shadow


def _stray(ctx: CheckContext, dist_name: str) -> Shadow | None:
    from pytest_unsloth.compat.shadow import find_shadow

    dist = ctx.dist(dist_name)
    return find_shadow(dist) if dist is not None else None


def make_kernel_check(name: str) -> Callable[[CheckContext], str]:
    """A check function reading the probe NAME."""

    row = PROBES_BY_NAME[name]

    def kernel_check(ctx: CheckContext) -> str:
        dist = row.dist
        required = any(r.lower().replace("_", "-") == dist for r in ctx.settings.require)
        if ctx.dist(dist) is None and not required:
            raise CheckSkipped(f"{dist} is not installed (not required)")
        res = ctx.probe(name)
        if res.status == "passed":
            return res.message
        if res.status == "skipped" and not (required and ctx.dist(dist) is None):
            raise CheckSkipped(res.message)
        why, fix = row.why, row.fix
        if ctx.dist(dist) is None:
            # Required but missing: the fix is the install line, pinned to the installed torch.
            raise CheckFailed(
                f"{dist} is not installed ({ctx.settings.source('require')} requires it)",
                why,
                install_keeping_torch(ctx, [dist]) + " (naming the installed torch keeps pip "
                "from replacing it with another build)",
            )
        found = f"{name} probe {res.message}" if res.status == "failed" else res.message
        stray = _stray(ctx, dist) or _stray(ctx, "torch")
        if stray is not None and res.status == "failed":
            raise CheckFailed(
                f"{found}: {stray.describe()}",
                "a file or folder named like the package earlier on the import path replaces it",
                stray.fix(),
            )
        note = stderr_summary(res.stderr_tail)
        if note and res.status == "failed" and note not in found:
            found += f" (stderr: {note})"
        raise CheckFailed(found, why, fix)

    kernel_check.__name__ = f"check_{name.replace('-', '_')}"
    kernel_check.__doc__ = f"The {name} kernel loads and runs in a clean interpreter."
    return kernel_check
