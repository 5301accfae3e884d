"""Reading speed of the fatbin reader (``pytest_unsloth.compat.archs``) on big CUDA libraries.

For each library: size, number of fatbin entries, median wall time of ``read_library`` over
``--runs`` reads (memory-mapped, headers only), and, when NVIDIA's cuobjdump is found, the
time of ``cuobjdump --list-elf`` on the same file for comparison.

Usage: python benchmarks/bench_archs.py [--runs N] [--json PATH] PATH_OR_DISTRIBUTION...
(default: bitsandbytes and torch). Torch's CUDA libraries (or ``pip download --no-deps
nvidia-cublas-cu12`` unzipped in a temporary folder) are the big ones: several hundred MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from pytest_unsloth.compat import archs


def bench(path: Path, runs: int, cuobjdump: str | None) -> dict[str, object]:
    """Median read time (ms) of one library, plus cuobjdump's time when available."""
    samples = []
    result = archs.read_library(path)
    for _ in range(runs):
        t = time.perf_counter()
        result = archs.read_library(path)
        samples.append((time.perf_counter() - t) * 1000)
    row: dict[str, object] = {
        "path": str(path),
        "mb": round(path.stat().st_size / 1e6, 1),
        "entries": result.entries,
        "sm": list(result.sm),
        "ptx": list(result.ptx),
        "read_ms": round(statistics.median(samples), 2),
    }
    if cuobjdump:
        t = time.perf_counter()
        subprocess.run([cuobjdump, "--list-elf", str(path)], capture_output=True, check=False)
        row["cuobjdump_ms"] = round((time.perf_counter() - t) * 1000, 1)
    return row


def main() -> None:
    """Measure every library with CUDA code among the given paths/distributions."""
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="*", default=["bitsandbytes", "torch"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    args = parser.parse_args()
    rows = []
    for spec in args.specs:
        for path in archs.expand(spec):
            if archs.read_library(path).has_cuda:
                rows.append(bench(path, args.runs, args.cuobjdump))
    rows.sort(key=lambda r: -float(r["mb"]))  # type: ignore[arg-type]
    total_mb = sum(float(r["mb"]) for r in rows)  # type: ignore[arg-type]
    total_ms = sum(float(r["read_ms"]) for r in rows)  # type: ignore[arg-type]
    for r in rows:
        extra = f"  cuobjdump {r['cuobjdump_ms']} ms" if "cuobjdump_ms" in r else ""
        print(f"{r['mb']:>8} MB {r['entries']:>6} entries {r['read_ms']:>8} ms{extra}  {r['path']}")
    print(f"total: {len(rows)} libraries, {total_mb:.0f} MB read in {total_ms:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "total_ms": total_ms}, indent=2))


if __name__ == "__main__":
    main()
