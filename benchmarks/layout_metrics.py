"""Layout figures for issue 12, measured on the source tree in one run.

Prints the number of top-level modules, the functions longer than 60 lines (with their length),
and module sizes, so a before/after comparison is one command on each commit.

Usage: python benchmarks/layout_metrics.py [--json PATH] [--limit N]
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "pytest_unsloth"


def long_functions(limit: int) -> list[tuple[str, str, int]]:
    """Every function or method longer than ``limit`` lines, longest first."""
    found: list[tuple[str, str, int]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    found.append((str(path.relative_to(PACKAGE)), node.name, length))
    return sorted(found, key=lambda row: -row[2])


def main() -> None:
    """Print (and optionally write) the layout figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--limit", type=int, default=60)
    args = parser.parse_args()
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    longest = long_functions(args.limit)
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py"))
    print(f"top-level modules: {len(top)}; packages: {', '.join(packages)}; lines: {lines}")
    print(f"functions over {args.limit} lines: {len(longest)}")
    for path, name, length in longest:
        print(f"  {length:4d}  {path}::{name}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "top_level_modules": top,
                    "packages": packages,
                    "lines": lines,
                    "long_functions": [{"path": p, "name": n, "lines": k} for p, n, k in longest],
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
