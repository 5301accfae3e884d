"""Start-up cost of the plugin, measured as ratios within one run.

1. Importing the entry-point module (``pytest_unsloth.plugin``) in fresh interpreters, from
   ``-X importtime`` (target: under 2 ms).
2. ``pytest --unsloth-env`` in an empty folder against a bare ``pytest --co`` there (target on a
   CPU machine: at most 1.5x, i.e. no torch import). Run it twice first so that, on a GPU
   machine, the second run shows the probe cache at work (issue 7 target: at most 1.5x too).

Usage: python benchmarks/bench_startup.py [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def import_ms(runs: int) -> float:
    """Median cumulative import time of pytest_unsloth.plugin (pytest already imported).

    Bytecode writing is allowed and one warm-up import writes the .pyc, as on a user's machine
    (PYTHONDONTWRITEBYTECODE would otherwise measure a recompile on every import).
    """
    samples = []
    for _ in range(runs + 1):
        out = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                "-c",
                "import pytest, pytest_unsloth.plugin",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[2] == "pytest_unsloth.plugin":
                samples.append(int(parts[1]) / 1000)
    return statistics.median(samples[1:])


def wall(argv: list[str], cwd: str, runs: int) -> tuple[float, int]:
    """Median wall time of a command and its last exit code."""
    times, code = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        code = subprocess.run(argv, cwd=cwd, capture_output=True).returncode
        times.append(time.perf_counter() - start)
    return statistics.median(times), code


def main() -> None:
    """Print (and optionally save) the numbers and their ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    py = [sys.executable, "-m", "pytest"]
    with tempfile.TemporaryDirectory() as empty:
        env_argv = [sys.executable, "-m", "pytest", "--unsloth-env", "-q"]
        first, _ = wall(env_argv, empty, 1)  # fills the probe cache where probes apply
        bare, _ = wall([*py, "--co", "-q"], empty, args.runs)
        env_run, code = wall(env_argv, empty, args.runs)
    imp = import_ms(args.runs * 2)
    result = {
        "python": sys.version.split()[0],
        "import_plugin_ms": round(imp, 3),
        "bare_pytest_co_s": round(bare, 3),
        "unsloth_env_first_run_s": round(first, 3),
        "unsloth_env_s": round(env_run, 3),
        "unsloth_env_exit_code": code,
        "ratio_env_to_bare": round(env_run / bare, 3),
    }
    print(f"import pytest_unsloth.plugin: {imp:.2f} ms (median of {args.runs * 2})")
    print(f"pytest --co (bare, empty folder): {bare:.3f} s")
    print(f"pytest --unsloth-env, first run:  {first:.3f} s")
    print(f"pytest --unsloth-env, later runs: {env_run:.3f} s (exit {code})")
    print(f"ratio env / bare: {env_run / bare:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    main()
