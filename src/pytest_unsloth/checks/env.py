"""Checks of what is installed: Python, packages, declared pins, known-bad combinations."""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import resources
from typing import TYPE_CHECKING, Any

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.registry import builtin_check
from pytest_unsloth.compat.distributions import (
    KEEP_IN_PLACE,
    STACK,
    Dist,
    active_extras,
    canonical,
    combined_specifier,
    format_specifier,
    keep_in_place,
    obviously_empty,
    safe_install_line,
)

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet


def _join(parts: list[str], limit: int = 4) -> str:
    if len(parts) <= limit:
        return "; ".join(parts)
    return "; ".join(parts[:limit]) + f"; and {len(parts) - limit} more"


@builtin_check("python", layer="stack", description="Python against Requires-Python of the stack")
def check_python(ctx: CheckContext) -> str:
    """The interpreter satisfies Requires-Python of every installed stack package."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    here = platform.python_version()
    bad = []
    for dist in ctx.inventory.installed():
        if not dist.requires_python:
            continue
        try:
            spec = SpecifierSet(dist.requires_python)
        except InvalidSpecifier:
            continue
        if not spec.contains(here, prereleases=True):
            bad.append((dist, spec))
    if bad:
        parts = [f"{d.name} {d.version} requires Python {format_specifier(s)}" for d, s in bad]
        combined = combined_specifier(s for _, s in bad)
        return _fail_python(here, parts, combined)
    return f"Python {here} satisfies every installed stack package's Requires-Python"


def _fail_python(here: str, parts: list[str], combined: SpecifierSet) -> str:
    raise CheckFailed(
        found=f"Python {here}, but {_join(parts)}",
        why="these packages were installed for another interpreter (a --target or --no-deps "
        "install skips this check) and may fail to import or misbehave",
        fix=f"use a Python matching {format_specifier(combined)} (e.g. a new virtualenv), or "
        "reinstall the packages for this interpreter: pip install --force-reinstall "
        + " ".join(p.split()[0] for p in parts),
    )


@builtin_check(
    "packages",
    layer="stack",
    description="installed stack, required packages, shadowing",
)
def check_packages(ctx: CheckContext) -> str:
    """Inventory of the stack from metadata; required-but-missing, broken or shadowed fails."""
    inv = ctx.inventory
    missing = [r for r in ctx.settings.require if inv.get(r) is None]
    broken = [d for d in inv.installed() if d.error]
    shadowed = [
        hits
        for hits in inv.dists.values()
        if len(hits) > 1
        and hits[0].version
        and any(h.version and h.version != hits[0].version for h in hits[1:])
    ]
    problems: list[str] = []
    fixes: list[str] = []
    why: list[str] = []
    if missing:
        problems.append("required but not installed: " + ", ".join(missing))
        why.append(f"{ctx.settings.source('require')} says the project needs them")
        from pytest_unsloth.checks.install import install_keeping_torch

        fixes.append(install_keeping_torch(ctx, missing, as_named=True))
    if broken:
        problems.append(_join([f"{d.name} at {d.location}: {d.error}" for d in broken]))
        why.append("a package with broken metadata is usually half-installed and fails to import")
        fixes.append("pip install --force-reinstall --no-deps " + " ".join(d.name for d in broken))
    if shadowed:
        problems.append(
            _join(
                [
                    f"{hits[0].name} {hits[0].version} (in {hits[0].location}) shadows "
                    + ", ".join(f"{h.name} {h.version} (in {h.location})" for h in hits[1:])
                    for hits in shadowed
                ]
            )
        )
        why.append(
            "Python imports the first copy on sys.path, while pip and other tools may "
            "report the other one"
        )
        fixes.append(
            "pip uninstall the stale copy (or remove it from PYTHONPATH/--target "
            "folders) so that one version of each package remains"
        )
    from pytest_unsloth.compat.shadow import find_shadows

    strays = find_shadows(inv)
    if strays:
        problems.append(_join([s.describe() for s in strays]))
        why.append(
            "Python imports the first match on its path, so a file or folder named like a "
            "package in the project folder or on PYTHONPATH replaces the package: imports fail "
            "with AttributeError or ImportError that look like a broken install"
        )
        fixes.append("; ".join(s.fix() for s in strays))
    if problems:
        raise CheckFailed("; ".join(problems), "; ".join(why), "; ".join(fixes))
    versions = inv.versions()
    if not versions:
        return "none of the stack is installed (" + ", ".join(STACK[:6]) + ", ...)"
    return ", ".join(f"{n} {v}" for n, v in versions.items())


def _installed(name: str) -> bool:
    from pytest_unsloth.util.versions import version_of

    return version_of(name) is not None


def _violations(
    ctx: CheckContext,
) -> tuple[dict[str, list[tuple[Dist, SpecifierSet]]], dict[str, list[tuple[Dist, SpecifierSet]]]]:
    """Per target package: (all declared specifiers, the violated ones), stack to stack only."""
    stack = {canonical(n) for n in STACK}
    declared: dict[str, list[tuple[Dist, SpecifierSet]]] = {}
    violated: dict[str, list[tuple[Dist, SpecifierSet]]] = {}
    for owner in ctx.inventory.installed():
        if owner.error:
            continue  # unreadable metadata is the packages check's finding, not a pin problem
        # Extras whose packages are installed count too: trl[vllm] pins vLLM's range.
        reqs = [(r, owner) for r in owner.requirements()] + [
            (r, dataclasses.replace(owner, name=f"{owner.name}[{extra}]"))
            for r, extra in active_extras(owner, _installed)
        ]
        for req, dist in reqs:
            target = canonical(req.name)
            if target not in stack or target == owner.key:
                continue
            declared.setdefault(target, []).append((dist, req.specifier))
            installed = ctx.inventory.get(target)
            if installed is not None and installed.error:
                continue
            ok = (
                installed is not None
                and installed.version != ""
                and (
                    not req.specifier or req.specifier.contains(installed.version, prereleases=True)
                )
            )
            if not ok:
                violated.setdefault(target, []).append((dist, req.specifier))
    return declared, violated


def _rank(key: str) -> int:
    """torch 0, what is built against it (torchvision, triton) 1, everything else 2."""
    if key == "torch":
        return 0
    return 1 if key in KEEP_IN_PLACE else 2


def movers_for(target: str, bad: list[tuple[Dist, SpecifierSet]]) -> list[Dist]:
    """The dependents to reinstall rather than moving ``target`` (built for another torch...)."""
    return [d for d, _ in bad if _rank(d.key) > _rank(target)]


def _pins_fix(
    ctx: CheckContext,
    target: str,
    installed: Dist | None,
    declared: list[tuple[Dist, SpecifierSet]],
    bad: list[tuple[Dist, SpecifierSet]],
) -> tuple[str, str]:
    """The fix line for one violated target, and a note on what it keeps in place.

    torch is never moved to satisfy a dependent: the dependent (xformers, vLLM, torchvision...
    built for one exact torch) is reinstalled for the installed torch instead. Where the
    declared ranges cannot all hold, the packages that disagree with the installed version are
    the ones to move first.
    """
    versions = ctx.inventory.versions()
    combined = combined_specifier(s for _, s in declared)
    movers = movers_for(target, bad)
    keep_target = installed is not None and target in KEEP_IN_PLACE
    if obviously_empty(combined) or (keep_target and movers):
        who = ", ".join(f"{d.name} ({format_specifier(s)})" for d, s in declared if s)
        line, note = safe_install_line([(d.name, None) for d in movers], versions)
        if installed is not None and movers:
            accept = [d.name for d, s in declared if d not in movers and s]
            first = (
                f"move {', '.join(d.name for d in movers)} first: "
                f"{'they disagree' if len(movers) > 1 else 'it disagrees'} with the installed "
                f"{installed.name} {installed.version}"
                + (f", which {', '.join(accept)} accept{'s' if len(accept) == 1 else ''}"
                   if accept else "")
            )  # fmt: skip
            head = f"no {target} version satisfies {who}; " if obviously_empty(combined) else ""
            return f"{head}{first}: {line}", note
        return (
            f"no {target} version satisfies {who}: upgrade or downgrade one of those packages "
            "so that their ranges overlap",
            "",
        )
    name = installed.name if installed else target
    return safe_install_line([(name, combined)], versions)


@builtin_check(
    "pins",
    layer="stack",
    description="declared Requires-Dist between stack packages hold",
)
def check_pins(ctx: CheckContext) -> str:
    """Every installed stack package's declared Requires-Dist on the stack holds."""
    declared, violated = _violations(ctx)
    if not violated:
        n = sum(len(v) for v in declared.values())
        return f"{n} declared requirement(s) between stack packages hold"
    found, fixes, why, notes = [], [], [], []
    # Dependents reinstalled for the installed torch/torchvision/triton: their other violated
    # requirements are moot (the reinstall brings a release with matching ones).
    moved = {
        d.key
        for target, bad in violated.items()
        if target in KEEP_IN_PLACE and ctx.inventory.get(target) is not None
        for d in movers_for(target, bad)
    }
    emitted: set[str] = set()
    for target, bad in violated.items():
        installed = ctx.inventory.get(target)
        have = (
            f"{installed.name} {installed.version} is installed"
            if installed
            else f"{target} is not installed"
        )
        needs = ", ".join(
            f"{d.name} {d.version} requires {target}{format_specifier(s)}" for d, s in bad
        )
        found.append(f"{needs}; {have}")
        fix, note = _pins_fix(ctx, target, installed, declared[target], bad)
        own = movers_for(target, bad) if target in KEEP_IN_PLACE and installed else []
        if own:
            if all(d.key in emitted for d in own):
                fix = ""  # the same reinstall is already on the line
            emitted.update(d.key for d in own)
        elif all(d.key in moved for d, _ in bad):
            fix = ""  # reinstalling the dependents brings releases with matching requirements
        if fix and fix not in fixes:
            fixes.append(fix)
        if note:
            notes.append(note)
        if installed is None:
            why.append(f"{target} is imported by its dependents and they fail without it")
        else:
            why.append(
                f"{target} {installed.version} is outside the range its dependents were "
                "released and tested with; --no-deps installs skip this check, and the "
                "mismatch shows up later as import errors or silent misbehaviour"
            )
    raise CheckFailed(_join(found), "; ".join(dict.fromkeys(why + notes)), " && ".join(fixes))


# ----------------------------------------------------------------------------------------------
# Known-bad combinations that metadata does not declare (data table shipped in the package).


def load_known_bad() -> list[dict[str, Any]]:
    """Rows of ``known_bad.json``."""
    text = resources.files("pytest_unsloth.compat").joinpath("known_bad.json").read_text("utf-8")
    rows: list[dict[str, Any]] = json.loads(text)["rows"]
    return rows


def _row_matches(ctx: CheckContext, row: dict[str, Any]) -> dict[str, str] | None:
    """Installed versions of the row's packages when every condition holds, else None."""
    from packaging.specifiers import SpecifierSet

    versions: dict[str, str] = {}
    for name, spec in row.get("when", {}).items():
        dist = ctx.inventory.get(name)
        if dist is None or not dist.version:
            return None
        if spec != "*" and not SpecifierSet(spec).contains(dist.version, prereleases=True):
            return None
        versions[canonical(name).replace("-", "_")] = dist.version
    return versions


def _torchvision_rule(ctx: CheckContext, row: dict[str, Any]) -> tuple[str, str] | None:
    """torchvision declaring torch==X with another torch installed: (found, fix) or None."""
    return _exact_pin_rule(ctx, {**row, "package": "torchvision", "on": "torch"})


def _torchvision_pairing_rule(ctx: CheckContext, row: dict[str, Any]) -> tuple[str, str] | None:
    """torchvision without a torch pin that does not pair with the installed torch release."""
    from packaging.version import InvalidVersion, Version

    tv, torch = ctx.inventory.get("torchvision"), ctx.inventory.get("torch")
    if tv is None or torch is None or not tv.version or not torch.version:
        return None
    if any(canonical(r.name) == "torch" and r.specifier for r in tv.requirements()):
        return None  # its own metadata decides (the torchvision-torch-mismatch row)
    try:
        t, v = Version(torch.version), Version(tv.version)
    except InvalidVersion:
        return None
    # Releases pair as torch 2.N <-> torchvision 0.(N+15) (2.0/0.15 ... 2.14/0.29).
    if t.major == 2 and v.major == 0 and v.minor != t.minor + 15:
        want = f"0.{t.minor + 15}.*"
        return (
            f"torchvision {tv.version} does not pair with torch {torch.version} (torch 2.{t.minor}"
            f" pairs with torchvision 0.{t.minor + 15})",
            f"pip install 'torchvision=={want}'",
        )
    return None


def _exact_pin_rule(ctx: CheckContext, row: dict[str, Any]) -> tuple[str, str] | None:
    """``package`` declares ``on==X`` (built for it) and another ``on`` is installed."""
    from packaging.specifiers import SpecifierSet

    pkg, on = ctx.inventory.get(row["package"]), ctx.inventory.get(row["on"])
    if pkg is None or on is None or not pkg.version or not on.version:
        return None
    for req in pkg.requirements():
        if canonical(req.name) != canonical(row["on"]):
            continue
        exact = [s for s in req.specifier if s.operator in ("==", "===")]
        if not exact or req.specifier.contains(on.version, prereleases=True):
            continue
        spec = SpecifierSet(",".join(str(s) for s in exact))
        versions = ctx.inventory.versions()
        if _rank(pkg.key) > _rank(on.key):  # reinstall the dependent, keep torch in place
            fix = safe_install_line([(pkg.name, None)], versions)[0]
        else:  # torch pins triton: bring the triton torch was built with
            fix = safe_install_line([(on.name, spec)], versions)[0]
        return (
            f"{pkg.name} {pkg.version} was built for {on.name}{format_specifier(spec)}, "
            f"{on.name} {on.version} is installed",
            fix,
        )
    return None


def _flash_attn_rule(ctx: CheckContext, row: dict[str, Any]) -> tuple[str, str] | None:
    """A prebuilt flash-attn wheel whose local version names another torch (``+cu12torch2.6``)."""
    import re

    fa, torch = ctx.inventory.get("flash-attn"), ctx.inventory.get("torch")
    if fa is None or torch is None:
        return None
    m = re.search(r"torch(\d+)\.(\d+)", fa.version.partition("+")[2])
    t = re.match(r"(\d+)\.(\d+)", torch.version)
    if not m or not t or (m.group(1), m.group(2)) == (t.group(1), t.group(2)):
        return None
    built = f"{m.group(1)}.{m.group(2)}"
    return (
        f"flash-attn {fa.version} is a wheel built for torch {built}, torch {torch.version} is "
        "installed",
        "pip install --no-build-isolation --force-reinstall --no-deps flash-attn (builds against "
        f"the installed torch), or the release wheel named torch{t.group(1)}.{t.group(2)}",
    )


RULES = {
    "torchvision-torch": _torchvision_rule,
    "torchvision-pairing": _torchvision_pairing_rule,
    "exact-pin": _exact_pin_rule,
    "flash-attn-local": _flash_attn_rule,
}


@builtin_check("known-bad", layer="stack", description="combinations known to break at run time")
def check_known_bad(ctx: CheckContext) -> str:
    """No installed combination matches a row of the known-bad table."""
    rows = load_known_bad()
    hits: list[tuple[str, str, str, str]] = []
    for row in rows:
        if "rule" in row:
            res = RULES[row["rule"]](ctx, row)
            if res is not None:
                hits.append((res[0], row["why"], res[1], row["source"]))
            continue
        versions = _row_matches(ctx, row)
        if versions is not None:
            found, fix = row["found"].format(**versions), row["fix"].format(**versions)
            hits.append((found, row["why"], fix, row["source"]))
    if not hits:
        return f"none of {len(rows)} known-bad combinations matches"
    versions = ctx.inventory.versions()
    fixes = [keep_in_place(h[2], versions) for h in hits]
    notes = list(dict.fromkeys(n for _, n in fixes if n))
    raise CheckFailed(
        _join([h[0] for h in hits]),
        "; ".join(f"{h[1]} (source: {h[3]})" for h in hits) + "".join(f"; {n}" for n in notes),
        " && ".join(dict.fromkeys(f for f, _ in fixes)),
    )


# ----------------------------------------------------------------------------------------------
# The project's own pins.


@builtin_check("user-pins", layer="stack", description="the project's unsloth_pins")
def check_user_pins(ctx: CheckContext) -> str:
    """The project's own pins from ``unsloth_pins``."""
    from packaging.requirements import Requirement

    pins = ctx.settings.pins
    if not pins:
        raise CheckSkipped("no unsloth_pins configured")
    found: list[str] = []
    fixes: list[tuple[str, str]] = []
    versions = ctx.inventory.versions()
    unreadable: list[str] = []
    for text in pins:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        dist = ctx.inventory.get(req.name)
        if dist is not None and dist.error:
            unreadable.append(dist.name)  # the packages check reports the broken metadata
            continue
        if dist is None:
            found.append(f"{req.name} is not installed (pinned {format_specifier(req.specifier)})")
            fixes.append(safe_install_line([(req.name, req.specifier)], versions))
        elif req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            found.append(f"{dist.name} {dist.version} does not satisfy the pin {text!r}")
            fixes.append(safe_install_line([(dist.name, req.specifier)], versions))
    if found:
        notes = list(dict.fromkeys(n for _, n in fixes if n))
        raise CheckFailed(
            _join(found),
            f"{ctx.settings.source('pins')} declares the versions this project was validated with"
            + "".join(f"; {n}" for n in notes),
            " && ".join(f for f, _ in fixes),
        )
    if unreadable:
        return (
            f"{len(pins) - len(unreadable)} pin(s) hold; not evaluated: {', '.join(unreadable)} "
            "(unreadable metadata, see unsloth-env::packages)"
        )
    return f"{len(pins)} pin(s) hold"


# ----------------------------------------------------------------------------------------------
# Supported windows kept in installed source (pytest_unsloth.compat.windows).


@builtin_check(
    "windows",
    layer="stack",
    description="versions inside windows kept in installed source",
)
def check_windows(ctx: CheckContext) -> str:
    """Installed versions sit inside the supported windows their dependents keep in code."""
    from packaging.specifiers import SpecifierSet

    from pytest_unsloth.compat.windows import read_windows

    windows = read_windows()
    if not windows:
        raise CheckSkipped("no installed package keeps a supported-version window in its source")
    found, why, fixes, judged = [], [], [], []
    versions = ctx.inventory.versions()
    for w in windows:
        dist = ctx.inventory.get(w.target)
        if dist is None or not dist.version:
            continue
        judged.append(f"{w.target} {dist.version} in {w.owner}'s {w.low}..{w.high}")
        if w.contains(dist.version):
            continue
        found.append(
            f"{w.target} {dist.version} is outside the {w.target} versions {w.owner} "
            f"{w.owner_version} supports ({w.low} to {w.high})"
        )
        why.append(
            f"{w.path}:{w.line}: `{w.text}` ({w.owner} only warns at import; the run then "
            "fails or misbehaves inside generation)"
        )
        line, note = safe_install_line([(dist.name, SpecifierSet(w.specifier))], versions)
        fixes.append(line)
        if note:
            why.append(note)
    if found:
        raise CheckFailed(_join(found), "; ".join(why), " && ".join(fixes))
    if not judged:
        raise CheckSkipped(
            "; ".join(f"{w.owner} supports {w.target}{w.specifier}" for w in windows)
            + "; nothing to judge: "
            + ", ".join(dict.fromkeys(w.target for w in windows))
            + " not installed"
        )
    return "; ".join(judged)
