"""Fake GPUs for the fake NVML (tests/fakes/nvml): one row per model, one call per GPU a test needs.

A test states only what it is about (free memory, UUID, MIG slices, running processes); the
model's name, compute capability and total memory come from the one table below.
"""

from __future__ import annotations

from typing import Any

GpuSpec = dict[str, Any]

# model -> (NVML name, compute capability, total memory in GiB as NVML reports it)
MODELS: dict[str, tuple[str, tuple[int, int], float]] = {
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), 79.2),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 79.6),
    "H200": ("NVIDIA H200", (9, 0), 139.8),
    "L4": ("NVIDIA L4", (8, 9), 22.5),
    "L40S": ("NVIDIA L40S", (8, 9), 44.4),
    "RTX_5090": ("NVIDIA GeForce RTX 5090", (12, 0), 31.4),
    "T4": ("Tesla T4", (7, 5), 15.0),
}


def fake_gpu(model: str, *, free_gib: float, uuid: str | None = None, **extra: Any) -> GpuSpec:
    """One fake GPU of ``model`` (a key of MODELS) as the fake NVML reads it."""
    name, capability, total_gib = MODELS[model]
    spec: GpuSpec = {"name": name, "total_gib": total_gib, "free_gib": free_gib}
    spec["capability"] = list(capability)
    if uuid is not None:
        spec["uuid"] = uuid
    return {**spec, **extra}
