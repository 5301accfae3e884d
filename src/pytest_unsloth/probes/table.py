"""Every probe, one row each: adding a kernel probe is one row here plus its child function.

The probe list, the distribution that makes each probe applicable, the ``requires_kernel`` help,
the kernel checks' why/fix lines and the child's dispatch are all read from ``PROBE_TABLE``.
Standard library only: the marker plugin imports this at configure time.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ProbeRow:
    """One probe: what it is called, when it applies, what the child runs, and the check's texts."""

    name: str  # requires_kernel('NAME'), unsloth-env::NAME, python -m pytest_unsloth.probes NAME
    dist: str  # the distribution whose presence makes the probe applicable
    child: str  # "module:function" under pytest_unsloth.probes, run in the child process
    # Why a broken kernel matters and the usual repair: the kernel check's second and third
    # lines. Empty for torch and nccl, whose checks (cuda, nccl) explain more than one cause.
    why: str = ""
    fix: str = ""
    min_gpus: int = 1  # visible GPUs it needs (skipped with the count otherwise)
    kernel: bool = True  # False for torch: the base every kernel stands on, not a kernel itself

    def child_function(self) -> Callable[[], dict[str, Any]]:
        """The function the child runs (imports its module, which must not import heavy ones)."""
        module, _, func = self.child.partition(":")
        found: Callable[[], dict[str, Any]] = getattr(
            importlib.import_module(f"pytest_unsloth.probes.{module}"), func
        )
        return found


PROBE_TABLE: tuple[ProbeRow, ...] = (
    ProbeRow("torch", "torch", "kernels:probe_torch", kernel=False),
    ProbeRow(
        "bitsandbytes",
        "bitsandbytes",
        "kernels:probe_bitsandbytes",
        why="load_in_4bit and QLoRA use these kernels; without them loading fails or silently "
        "falls back to 16-bit and runs out of memory",
        fix="pip install --force-reinstall --no-deps 'bitsandbytes>=0.46.1' (its wheel must "
        "match torch's CUDA major version)",
    ),
    ProbeRow(
        "triton",
        "triton",
        "kernels:probe_triton",
        why="unsloth's fused kernels and torch.compile are Triton kernels; a broken Triton fails "
        "at the first training step",
        fix="reinstall the triton release your torch declares (pip install --force-reinstall "
        "torch pulls the matching triton); make sure a C compiler is on PATH",
    ),
    ProbeRow(
        "flash-attn",
        "flash-attn",
        "kernels:probe_flash_attn",
        why="attn_implementation='flash_attention_2' calls these kernels; an ABI mismatch "
        "crashes at the first forward",
        fix="pip install --force-reinstall --no-build-isolation flash-attn (built against the "
        "installed torch), or uninstall it to fall back to sdpa",
    ),
    ProbeRow(
        "xformers",
        "xformers",
        "kernels:probe_xformers",
        why="unsloth and vLLM use xformers attention when it is installed; a build for another "
        "torch fails or falls back silently",
        fix="pip install --force-reinstall xformers matching the installed torch (see its "
        "Requires-Dist), or uninstall it",
    ),
    ProbeRow(
        "unsloth",
        "unsloth",
        "kernels:probe_unsloth",
        why="a training script's first line `import unsloth` fails the same way, after the job "
        "has already been scheduled",
        fix="reinstall it without touching torch: pip install --force-reinstall --no-deps "
        "unsloth unsloth_zoo, then fix what the pins check reports",
    ),
    ProbeRow(
        "vllm",
        "vllm",
        "kernels:probe_vllm",
        why="fast_inference=True / use_vllm=True start vLLM; a vLLM built for another torch "
        "fails at model load after minutes",
        fix="pip install the vllm release built for the installed torch (vllm's Requires-Dist "
        "names it), or set fast_inference=False",
    ),
    ProbeRow("nccl", "torch", "nccl:probe_nccl", min_gpus=2),
)

PROBES_BY_NAME: Mapping[str, ProbeRow] = {row.name: row for row in PROBE_TABLE}
PROBE_NAMES: tuple[str, ...] = tuple(PROBES_BY_NAME)
# Probe name -> the distribution whose presence makes it applicable.
PROBE_DISTS: Mapping[str, str] = {row.name: row.dist for row in PROBE_TABLE}
# Probes that need more than one visible GPU (skipped with the count otherwise).
PROBE_MIN_GPUS: Mapping[str, int] = {r.name: r.min_gpus for r in PROBE_TABLE if r.min_gpus > 1}
KERNEL_PROBES: tuple[str, ...] = tuple(row.name for row in PROBE_TABLE if row.kernel)
# The names as the requires_kernel help lists them: the kernels with a check of their own
# first, then torch and nccl.
KERNEL_HELP_NAMES = ", ".join(
    [r.name for r in PROBE_TABLE if r.why] + [r.name for r in PROBE_TABLE if not r.why]
)
