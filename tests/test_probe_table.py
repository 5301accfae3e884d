"""The kernel-probe table: every place that lists probes is derived from its rows."""

from __future__ import annotations

import pytest

from pytest_unsloth.checks import kernels as kernel_checks
from pytest_unsloth.markers import MARKER_HELP
from pytest_unsloth.probes.table import (
    KERNEL_PROBES,
    PROBE_DISTS,
    PROBE_MIN_GPUS,
    PROBE_NAMES,
    PROBE_TABLE,
    ProbeRow,
)


def test_lists_in_table_order() -> None:
    assert PROBE_NAMES == (
        "torch",
        "bitsandbytes",
        "triton",
        "flash-attn",
        "xformers",
        "unsloth",
        "vllm",
        "nccl",
    )
    assert tuple(n for n in PROBE_NAMES if n != "torch") == KERNEL_PROBES
    assert PROBE_DISTS["nccl"] == "torch" and PROBE_DISTS["flash-attn"] == "flash-attn"
    assert PROBE_MIN_GPUS == {"nccl": 2}


@pytest.mark.parametrize("row", PROBE_TABLE, ids=lambda row: row.name)
def test_every_row_names_a_child_function(row: ProbeRow) -> None:
    func = row.child_function()
    assert callable(func) and func.__name__ == row.child.partition(":")[2]


def test_marker_help_lists_every_probe() -> None:
    help_text = MARKER_HELP["requires_kernel"]
    assert "(names: bitsandbytes, triton, flash-attn, xformers, unsloth, vllm, torch, nccl)" in (
        help_text
    )


def test_every_kernel_check_reads_its_why_and_fix_from_the_row() -> None:
    for row in PROBE_TABLE:
        if row.kernel and row.name != "nccl":
            assert row.why and row.fix, row.name
            assert kernel_checks.make_kernel_check(row.name).__name__ == (
                f"check_{row.name.replace('-', '_')}"
            )
