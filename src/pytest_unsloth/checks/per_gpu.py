"""Kernel probes on every kind of GPU the machine has, when xdist pinning narrowed this worker.

Pinning (``--unsloth-gpus-per-worker``) gives each xdist worker its own GPUs for the user's
tests. The environment checks describe the machine, so on a pinned worker they read NVML with the
``CUDA_VISIBLE_DEVICES`` the user gave pytest and run each kernel probe once per distinct GPU
model and compute capability, each child pinned to one GPU of that kind, all in parallel. A probe
that fails on one kind of GPU fails the check and names the GPUs it failed on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pytest_unsloth.probes.protocol import ProbeResult
from pytest_unsloth.probes.runner import Pin

if TYPE_CHECKING:
    from pytest_unsloth.gpu import GpuDevice, NvmlSnapshot
    from pytest_unsloth.probes.runner import ProbeStore


@dataclasses.dataclass(frozen=True)
class GpuGroup:
    """GPUs of one model and compute capability, and the pin a probe for them runs with."""

    pin: Pin
    devices: tuple[GpuDevice, ...]

    @property
    def label(self) -> str:
        """``cuda:0, cuda:1 (NVIDIA H200, sm_90)``: CUDA indices as the user's tests number them."""
        first = self.devices[0]
        where = ", ".join(f"cuda:{d.cuda_index}" for d in self.devices)
        major, minor = first.capability
        return f"{where} ({first.name}, sm_{major}{minor})"


def gpu_groups(snap: NvmlSnapshot) -> list[GpuGroup]:
    """One group per distinct (model, compute capability) among the visible GPUs, in CUDA order."""
    groups: dict[tuple[str, tuple[int, int]], list[GpuDevice]] = {}
    for dev in snap.visible:
        groups.setdefault((dev.name, dev.capability), []).append(dev)
    return [GpuGroup(Pin(devs[0].uuid), tuple(devs)) for devs in groups.values()]


def probe_every_kind(store: ProbeStore, name: str, groups: Sequence[GpuGroup]) -> ProbeResult:
    """Run probe NAME once per group (concurrently) and fold the results into one."""
    for group in groups:
        store.start([name], group.pin)
    results = [(group, store.get(name, group.pin)) for group in groups]
    return combine(name, results)


def combine(name: str, results: Sequence[tuple[GpuGroup, ProbeResult]]) -> ProbeResult:
    """One result naming the GPUs each part covers; any failure fails it and names its GPUs."""
    covers = [
        {
            "gpus": g.label,
            "uuid": g.pin.cuda_visible_devices,
            "status": r.status,
            "message": r.message,
        }
        for g, r in results
    ]
    failed = [(g, r) for g, r in results if r.status == "failed"]
    passed = [(g, r) for g, r in results if r.status == "passed"]
    base = (failed or passed or list(results))[0][1]
    if failed:
        parts = [f"on {g.label}: {r.message}" for g, r in failed]
        if passed:
            parts.append("passed on " + "; ".join(g.label for g, _ in passed))
        message = "; ".join(parts)
    elif passed:
        message = f"{base.message} (on {'; '.join(g.label for g, _ in results)})"
    else:
        message = base.message
    status = "failed" if failed else "passed" if passed else base.status
    return dataclasses.replace(
        base,
        name=name,
        status=status,
        message=message,
        data={**dict(base.data), "gpus": covers},
        duration=max(r.duration for _, r in results),
        stderr_tail="\n".join(r.stderr_tail for _, r in failed if r.stderr_tail),
    )
