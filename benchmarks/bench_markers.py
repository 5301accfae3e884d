"""What the requires_* markers add to a run: N marked tests against the same N tests unmarked.

Both sets run in one pytest session (same process, same warm caches); a small plugin times each
test's whole protocol (setup, call, teardown) and sums the two groups, so the difference is the
markers' cost. Marked tests carry the common gates: requires_vram (free memory, read per test),
requires_gpu and requires_bf16; they all pass, so both groups run the same test bodies.

    python benchmarks/bench_markers.py            # real NVML if it answers, else the fake
    python benchmarks/bench_markers.py --fake     # always the fake NVML (tests/fakes/nvml)
    python benchmarks/bench_markers.py -n 1000 --repeat 5

Target (issue 3): 1000 marked tests add under 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_DIR = ROOT / "tests" / "fakes" / "nvml"
FAKE_SPEC = {
    "driver": "580.159.04",
    "cuda_driver": 13000,
    "gpus": [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "total_gib": 79.6,
            "free_gib": 79.0,
            "capability": [9, 0],
        }
    ],
}

# Marked and unmarked tests alternate in one file, so machine noise hits both groups alike.
TESTS = """
import pytest

GATES = [pytest.mark.requires_vram(0.5), pytest.mark.requires_gpu, pytest.mark.requires_bf16]

@pytest.mark.parametrize(
    "i", [pytest.param(i, marks=GATES if i % 2 else [], id=f"{{'m' if i % 2 else 'u'}}{{i}}")
          for i in range(2 * {n})]
)
def test_gate(i):
    pass
"""


class Timer:
    """Sums each test's protocol time into its group (file name)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {"marked": 0.0, "unmarked": 0.0}
        self.outcomes: dict[str, int] = {}

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        """Time the whole protocol of one test."""
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            group = "marked" if "[m" in item.nodeid else "unmarked"
            self.totals[group] += time.perf_counter() - start

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Count outcomes, to prove the marked tests really ran."""
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.outcome] = self.outcomes.get(report.outcome, 0) + 1


def nvml_is_real() -> bool:
    from pytest_unsloth.gpu import read_snapshot

    snap = read_snapshot()
    return snap.available and bool(snap.visible)


def use_fake(folder: Path) -> None:
    spec = folder / "nvml.json"
    spec.write_text(json.dumps(FAKE_SPEC))
    os.environ["PYTEST_UNSLOTH_FAKE_NVML"] = str(spec)
    sys.path.insert(0, str(FAKE_DIR))
    sys.modules.pop("pynvml", None)


def one_run() -> tuple[dict[str, float], dict[str, int], float]:
    """One session; returns group totals (s), outcomes, and time inside marker evaluation (s)."""
    from pytest_unsloth import markers

    timer = Timer()
    inside = [0.0]
    evaluate = markers.evaluate_item

    def timed(item: pytest.Item) -> str | None:
        start = time.perf_counter()
        try:
            return evaluate(item)
        finally:
            inside[0] += time.perf_counter() - start

    markers.evaluate_item = timed  # looked up at call time by the setup hook
    try:
        code = pytest.main(
            [
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:xdist",
                # this script imported pytest_unsloth before pytest could mark it for rewriting
                "-W",
                "ignore::pytest.PytestAssertRewriteWarning",
                "test_gate.py",
            ],
            plugins=[timer],
        )
    finally:
        markers.evaluate_item = evaluate
    if code != 0:
        raise SystemExit(f"benchmark session failed with exit code {code}")
    return timer.totals, timer.outcomes, inside[0]


def main() -> None:
    """Run the benchmark and print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="tests per group (default 1000)")
    parser.add_argument("--repeat", type=int, default=5, help="sessions (default 5)")
    parser.add_argument("--fake", action="store_true", help="always use the fake NVML")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        real = not args.fake and nvml_is_real()
        if not real:
            use_fake(folder)
        (folder / "test_gate.py").write_text(TESTS.format(n=args.n))
        os.chdir(folder)
        diffs: list[float] = []
        marked: list[float] = []
        unmarked: list[float] = []
        inside: list[float] = []
        outcomes: dict[str, int] = {}
        for _ in range(args.repeat):
            totals, outcomes, evaluating = one_run()
            marked.append(totals["marked"])
            unmarked.append(totals["unmarked"])
            diffs.append(totals["marked"] - totals["unmarked"])
            inside.append(evaluating)

    m, u = statistics.median(marked), statistics.median(unmarked)
    d, e = statistics.median(diffs), statistics.median(inside)
    print()
    print(
        f"NVML: {'real' if real else 'fake (tests/fakes/nvml)'}; {args.n} marked and {args.n} "
        f"unmarked tests interleaved in one session; median of {args.repeat} sessions; "
        f"outcomes of the last: {outcomes}"
    )
    print(f"marked   (requires_vram + requires_gpu + requires_bf16): {m * 1000:8.1f} ms")
    print(f"unmarked                                               : {u * 1000:8.1f} ms")
    print(f"difference: {d * 1000:.1f} ms ({d / args.n * 1e6:.1f} us per test); ratio {m / u:.2f}x")
    print(f"inside marker evaluation (evaluate_item, all tests): {e * 1000:.1f} ms")
    per_1000 = max(d, e) * 1000 / args.n * 1000
    verdict = "met" if per_1000 < 50 else "MISSED"
    print(f"target: < 50 ms per 1000 marked tests: {per_1000:.1f} ms -> {verdict}")


if __name__ == "__main__":
    main()
