"""All kernel probes started together against each one alone (run it on the GPU machine).

Runs every applicable probe concurrently through the plugin's ProbeStore (no cache) and reports
the wall time, each probe's own duration, their sequential sum, and the ratio of the wall time
to the slowest single probe (target: at most 1.2x).

Usage: python benchmarks/bench_probes.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

from pytest_unsloth.probes.runner import ProbeStore
from pytest_unsloth.probes.table import PROBE_NAMES
from pytest_unsloth.settings import Settings


def main() -> None:
    """Probe everything at once and print the timings."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    store = ProbeStore(Settings(probe_timeout=args.timeout))
    start = time.perf_counter()
    store.start(PROBE_NAMES)
    results = {name: store.get(name) for name in PROBE_NAMES}
    total = time.perf_counter() - start
    ran = {n: r for n, r in results.items() if r.duration > 0}
    for name, r in results.items():
        print(f"{name:<13} {r.status:<8} {r.duration:7.2f} s  {r.message}")
    if not ran:
        print("no probe ran (no GPU or nothing installed)")
        return
    slowest = max(r.duration for r in ran.values())
    seq = sum(r.duration for r in ran.values())
    print(f"wall {total:.2f} s; slowest single probe {slowest:.2f} s; sequential sum {seq:.2f} s")
    print(f"ratio wall / slowest: {total / slowest:.2f}x (target <= 1.2x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "wall_s": total,
                    "slowest_s": slowest,
                    "sequential_sum_s": seq,
                    "ratio": total / slowest,
                    "probes": {n: r.to_json() for n, r in results.items()},
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
