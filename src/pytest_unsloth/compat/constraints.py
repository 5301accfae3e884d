"""Per-package compatibility report, and a pip constraints file for the stack as it works now.

``python -m pytest_unsloth.constraints [-o constraints.txt] [--all]`` writes ``name==version``
for every installed stack package (``--all``: every installed distribution), so a working
environment can be rebuilt with ``pip install -c constraints.txt ...``. Nothing is imported:
versions and requirements come from metadata, windows from installed source.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_unsloth.compat.distributions import (
    STACK,
    Distributions,
    active_extras,
    canonical,
    format_specifier,
)


def _installed(name: str) -> bool:
    from pytest_unsloth.util.versions import version_of

    return version_of(name) is not None  # never raises, even on unreadable metadata


def package_report(inv: Distributions) -> dict[str, dict[str, Any]]:
    """Per installed stack package: version, who requires it with which range, verdict."""
    from pytest_unsloth.compat.windows import read_windows

    installed = {d.key: d for d in inv.installed()}
    out: dict[str, dict[str, Any]] = {
        d.name: {"version": d.version, "required_by": [], "verdict": "ok"}
        for d in installed.values()
    }
    by_key = {d.key: d.name for d in installed.values()}
    for owner in installed.values():
        reqs = [(r, None) for r in owner.requirements()] + list(active_extras(owner, _installed))
        for req, extra in reqs:
            key = canonical(req.name)
            if key not in by_key or key == owner.key:
                continue
            target = installed[key]
            ok = not req.specifier or req.specifier.contains(target.version, prereleases=True)
            out[by_key[key]]["required_by"].append(
                {
                    "by": owner.name + (f"[{extra}]" if extra else ""),
                    "version": owner.version,
                    "spec": format_specifier(req.specifier) or "any",
                    "source": "metadata",
                    "ok": ok,
                }
            )
    for w in read_windows():
        key = canonical(w.target)
        if key in by_key:
            out[by_key[key]]["required_by"].append(
                {
                    "by": w.owner,
                    "version": w.owner_version,
                    "spec": w.specifier,
                    "source": f"{w.path}:{w.line}",
                    "ok": w.contains(installed[key].version),
                }
            )
    for entry in out.values():
        bad = [r for r in entry["required_by"] if not r["ok"]]
        if bad:
            entry["verdict"] = "outside " + "; ".join(
                f"{r['by']} {r['version']} ({r['spec']})" for r in bad
            )
    return out


def report_lines(report: dict[str, dict[str, Any]]) -> list[str]:
    """One line per package for ``--unsloth-env -v``: version, requirers, verdict."""
    lines = []
    width = max((len(n) for n in report), default=0) + 1
    for name, entry in report.items():
        reqs = ", ".join(
            f"{r['by']} {r['spec']}{'' if r['ok'] else ' (violated)'}"
            for r in entry["required_by"]
            if r["spec"] != "any" or not r["ok"]
        )
        lines.append(
            f"{name:<{width}}{entry['version']:<16} {entry['verdict']:<3}"
            + (f"  required by {reqs}" if reqs else "")
        )
    return lines


def constraints_text(all_packages: bool = False) -> str:
    """``name==version`` lines (stack packages, or every installed distribution)."""
    if all_packages:
        seen: dict[str, str] = {}
        for d in md.distributions():
            try:  # a broken install must not stop the file being written
                name, version = d.metadata["Name"], d.version
            except Exception:
                continue
            if name and version and canonical(name) not in seen:
                seen[canonical(name)] = f"{name}=={version}"
        pins = sorted(seen.values(), key=str.lower)
    else:
        pins = [
            f"{d.name}=={d.version}" for d in Distributions.read(STACK).installed() if d.version
        ]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    head = [
        f"# pip constraints for the stack as installed ({sys.executable}), {stamp}",
        "# written by python -m pytest_unsloth.constraints; use: pip install -c THIS_FILE ...",
        "# local versions (+cu130) need the index they came from, e.g. "
        "--extra-index-url https://download.pytorch.org/whl/cu130",
    ]
    return "\n".join(head + pins) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pytest_unsloth.constraints [-o PATH] [--all]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_unsloth.constraints",
        description="Write a pip constraints file pinning the installed stack (name==version).",
    )
    parser.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    parser.add_argument(
        "--all", action="store_true", help="pin every installed distribution, not only the stack"
    )
    args = parser.parse_args(argv)
    text = constraints_text(args.all)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        args.output.write_text(text, "utf-8")
    except OSError as exc:
        print(f"cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(text.splitlines()) - 3} pins to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
