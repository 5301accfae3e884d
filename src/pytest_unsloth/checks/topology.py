"""The ``topology`` check: NVML's view of the GPUs as a group (no CUDA, no torch).

Per GPU: persistence and compute mode, ECC errors waiting for a reset, clocks held down for
power or heat right now, MIG layout. Per pair of visible GPUs: the link (NVLink, or the PCIe
level of their common ancestor) and P2P read/write status in both directions, as NVML reports
them. Every query is optional: a virtualised GPU refusing one degrades that field only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.registry import builtin_check

if TYPE_CHECKING:
    from pytest_unsloth.gpu import GpuDevice

# nvmlGpuTopologyLevel_t, closest first (nvidia-smi topo -m's names).
LEVELS = {0: "SAME", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
LEVEL_TEXT = {
    "SAME": "same board",
    "PIX": "one PCIe switch",
    "PXB": "several PCIe switches",
    "PHB": "PCIe host bridge",
    "NODE": "host bridges within a NUMA node",
    "SYS": "across NUMA nodes (SMP interconnect)",
}
COMPUTE_MODES = {0: "Default", 1: "Exclusive Thread", 2: "Prohibited", 3: "Exclusive Process"}
# Clock event reasons that mean "slowed down by heat or a hardware/power limit right now".
THROTTLE_BITS = {
    0x8: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
}
POWER_CAP = 0x4
P2P_STATUS = {
    0: "ok",
    1: "chipset not supported",
    2: "GPU not supported",
    3: "IOH topology not supported",
    4: "disabled by regkey",
    5: "not supported",
    6: "unknown",
}


@dataclasses.dataclass
class GpuFacts:
    """What NVML says about one GPU (None where it would not answer)."""

    label: str
    persistence: bool | None = None
    compute_mode: int | None = None
    retired_pending: bool | None = None
    remap_pending: bool | None = None
    remap_failed: bool | None = None
    ecc_uncorrected: int | None = None
    throttle: int | None = None
    nvlinks: int | None = None
    mig: str | None = None


@dataclasses.dataclass
class PairFacts:
    """The link between two GPUs."""

    a: str
    b: str
    level: str | None = None
    nvlink: bool = False
    read: tuple[str, str] = ("?", "?")  # a->b, b->a
    write: tuple[str, str] = ("?", "?")


def _int_const(nv: Any, name: str, default: int) -> int:
    """An NVML constant as an int: nvidia-ml-py defines NVML_P2P_CAPS_INDEX_READ as ``0,``
    (a 1-tuple), which ctypes refuses, so using it as is fails every P2P read query."""
    value = getattr(nv, name, default)
    if isinstance(value, tuple | list):
        value = value[0] if len(value) == 1 else default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _ask(func: Any, *args: Any) -> Any:
    """One NVML query; None when the function is missing or refuses (NotSupported, ...)."""
    if func is None:
        return None
    try:
        return func(*args)
    except Exception:
        return None


def _nvlinks(nv: Any, handle: Any) -> int | None:
    func = getattr(nv, "nvmlDeviceGetNvLinkState", None)
    if func is None:
        return None
    active = 0
    for link in range(_int_const(nv, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            active += 1 if func(handle, link) else 0
        except Exception as exc:
            # NotSupported on the first link: no NVLink at all; InvalidArgument: past the last.
            if link == 0 and "Invalid" not in str(exc):
                return None
            break
    return active


def gpu_facts(nv: Any, handle: Any, dev: GpuDevice) -> GpuFacts:
    """Modes, ECC, clocks and NVLink count of one GPU."""
    f = GpuFacts(dev.label)
    pm = _ask(getattr(nv, "nvmlDeviceGetPersistenceMode", None), handle)
    f.persistence = None if pm is None else bool(pm)
    f.compute_mode = _ask(getattr(nv, "nvmlDeviceGetComputeMode", None), handle)
    pending = _ask(getattr(nv, "nvmlDeviceGetRetiredPagesPendingStatus", None), handle)
    f.retired_pending = None if pending is None else bool(pending)
    rows = _ask(getattr(nv, "nvmlDeviceGetRemappedRows", None), handle)
    if rows is not None:
        f.remap_pending, f.remap_failed = bool(rows[2]), bool(rows[3])
    f.ecc_uncorrected = _ask(
        getattr(nv, "nvmlDeviceGetTotalEccErrors", None),
        handle,
        _int_const(nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
        _int_const(nv, "NVML_VOLATILE_ECC", 0),
    )
    reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    f.throttle = _ask(reasons, handle)
    f.nvlinks = _nvlinks(nv, handle)
    return f


def pair_facts(nv: Any, ha: Any, hb: Any, a: str, b: str) -> PairFacts:
    """Link level, NVLink and directional P2P status between two GPUs."""
    p = PairFacts(a, b)
    level = _ask(getattr(nv, "nvmlDeviceGetTopologyCommonAncestor", None), ha, hb)
    p.level = None if level is None else LEVELS.get(int(level), str(level))
    status = getattr(nv, "nvmlDeviceGetP2PStatus", None)
    ok = _int_const(nv, "NVML_P2P_STATUS_OK", 0)

    def both(index: int) -> tuple[str, str]:
        out = []
        for x, y in ((ha, hb), (hb, ha)):
            s = _ask(status, x, y, index)
            out.append("?" if s is None else P2P_STATUS.get(int(s), str(s)))
        return out[0], out[1]

    p.read = both(_int_const(nv, "NVML_P2P_CAPS_INDEX_READ", 0))
    p.write = both(_int_const(nv, "NVML_P2P_CAPS_INDEX_WRITE", 1))
    nvl = _ask(status, ha, hb, _int_const(nv, "NVML_P2P_CAPS_INDEX_NVLINK", 2))
    p.nvlink = nvl is not None and int(nvl) == ok
    return p


def read_layout(devices: tuple[GpuDevice, ...]) -> tuple[list[GpuFacts], list[PairFacts]]:
    """Query NVML for the given (visible, physical) GPUs and each pair of them."""
    import pynvml as nv

    nv.nvmlInit()
    try:
        handles = [nv.nvmlDeviceGetHandleByIndex(d.nvml_index) for d in devices]
        gpus = [gpu_facts(nv, h, d) for h, d in zip(handles, devices, strict=True)]
        pairs = [
            pair_facts(nv, handles[i], handles[j], _short(devices[i]), _short(devices[j]))
            for i in range(len(devices))
            for j in range(i + 1, len(devices))
        ]
    finally:
        with contextlib.suppress(Exception):
            nv.nvmlShutdown()
    return gpus, pairs


def _short(dev: GpuDevice) -> str:
    return f"cuda:{dev.cuda_index}" if dev.cuda_index is not None else f"nvml:{dev.nvml_index}"


def _pair_text(p: PairFacts) -> str:
    link = "NVLink" if p.nvlink else (p.level or "?")
    read = p.read[0] if p.read[0] == p.read[1] else f"{p.read[0]}/{p.read[1]}"
    write = p.write[0] if p.write[0] == p.write[1] else f"{p.write[0]}/{p.write[1]}"
    via = f" via {p.level}" if p.nvlink and p.level else ""
    return f"{p.a}<->{p.b} {link}{via} (P2P read {read}, write {write})"


def _gpu_text(f: GpuFacts) -> str:
    parts = []
    if f.compute_mode is not None:
        parts.append(f"compute {COMPUTE_MODES.get(f.compute_mode, f.compute_mode)}")
    if f.persistence is not None:
        parts.append(f"persistence {'on' if f.persistence else 'off'}")
    if f.nvlinks:
        parts.append(f"{f.nvlinks} NVLinks active")
    if f.throttle is not None and f.throttle & POWER_CAP:
        parts.append("clocks at the power cap")
    if f.mig:
        parts.append(f.mig)
    return f"{f.label.split(' ', 1)[0]}: " + ", ".join(parts) if parts else ""


def _mig_layout(ctx: CheckContext, dev: GpuDevice) -> str | None:
    if not dev.mig_enabled:
        return None
    parts = [m for m in ctx.nvml.mig_instances if m.parent_uuid == dev.uuid]
    shown = ", ".join(m.name.rsplit(" ", 1)[-1] for m in parts) or "no instances"
    return f"MIG on ({shown})"


def _problems(ctx: CheckContext, gpus: list[GpuFacts], devs: tuple[GpuDevice, ...]) -> list[str]:
    found: list[str] = []
    for f, d in zip(gpus, devs, strict=True):
        if f.compute_mode == 2:
            found.append(f"{f.label} is in compute mode Prohibited: no process can use it")
        elif f.compute_mode in (1, 3) and d.processes:
            pids = ", ".join(str(p.pid) for p in d.processes)
            found.append(
                f"{f.label} is in compute mode {COMPUTE_MODES[f.compute_mode]} and already "
                f"held by pid {pids}: a second process (your job, a probe, a vLLM worker) "
                "cannot open it"
            )
        if f.retired_pending or f.remap_pending:
            what = "row remapping" if f.remap_pending else "page retirement"
            found.append(f"{f.label} has an ECC {what} pending until the GPU is reset")
        if f.remap_failed:
            found.append(f"{f.label} failed to remap a memory row (uncorrectable ECC hardware)")
        if f.ecc_uncorrected:
            found.append(f"{f.label} reports {f.ecc_uncorrected} uncorrected ECC error(s)")
        if f.throttle:
            slow = [t for bit, t in THROTTLE_BITS.items() if f.throttle & bit]
            if slow:
                found.append(f"{f.label} clocks are held down right now: {', '.join(slow)}")
    return found


@builtin_check(
    "topology",
    layer="gpu",
    description="GPU links, P2P, compute mode, ECC, clocks, MIG (NVML)",
    needs_gpu=True,
)
def check_topology(ctx: CheckContext) -> str:
    """Links, P2P status, modes, ECC, clocks and MIG layout of the visible GPUs, from NVML."""
    from pytest_unsloth.checks.cuda import visible_gpus

    visible = visible_gpus(ctx)
    # Facts about hardware: for a MIG instance, ask its parent GPU.
    by_uuid = {d.uuid: d for d in ctx.nvml.devices}
    physical: list[GpuDevice] = []
    for d in visible:
        parent = by_uuid.get(d.parent_uuid or "", d) if d.is_mig else d
        if parent not in physical:
            physical.append(parent)
    devs = tuple(physical)
    try:
        gpus, pairs = read_layout(devs)
    except Exception as exc:
        raise CheckSkipped(f"NVML would not answer topology queries: {exc}") from None
    for f, d in zip(gpus, devs, strict=True):
        f.mig = _mig_layout(ctx, d)
    problems = _problems(ctx, gpus, devs)
    one_way = [p for p in pairs if (p.read[0] == "ok") != (p.read[1] == "ok")]
    for p in one_way:
        problems.append(
            f"{p.a}<->{p.b} P2P reads are granted one way only ({p.a}->{p.b} {p.read[0]}, "
            f"{p.b}->{p.a} {p.read[1]})"
        )
    layout = "; ".join([_pair_text(p) for p in pairs] + [t for t in map(_gpu_text, gpus) if t])
    if problems:
        raise CheckFailed(
            "; ".join(problems),
            "a GPU in this state fails or slows every job on it: exclusive/prohibited modes "
            "refuse a second CUDA context, pending ECC repairs need a reset, throttled clocks "
            "make steps several times slower, and one-way P2P makes NCCL hang or corrupt data",
            "nvidia-smi -c DEFAULT (as root) for the compute mode; nvidia-smi -r or a reboot for "
            "pending ECC repairs; check cooling and power (nvidia-smi -q -d PERFORMANCE); for "
            "one-way P2P export NCCL_P2P_DISABLE=1 (see unsloth-env::nccl)",
        )
    notes = []
    far = [p for p in pairs if not p.nvlink and p.level in ("PHB", "NODE", "SYS")]
    if far:
        notes.append(
            "pairs without NVLink across the host bridge: prefer DDP for LoRA (FSDP/ZeRO-3 move "
            "full weights every step)"
        )
    no_p2p = [p for p in pairs if p.read == ("not supported", "not supported")]
    if no_p2p:
        notes.append("no P2P reads: NCCL stages transfers through host memory (slower)")
    if len(devs) == 1:
        layout = layout or f"{devs[0].label}"
        layout = "one GPU: " + layout
    return layout + (f" [{'; '.join(notes)}]" if notes else "")
