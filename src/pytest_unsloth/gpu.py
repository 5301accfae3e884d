"""NVML inventory of the GPUs and the mapping from NVML's physical order to what CUDA sees.

NVML numbers GPUs physically and ignores ``CUDA_VISIBLE_DEVICES``; CUDA renumbers them through
that variable. Everything here asks NVML only (no torch, no CUDA context), so it is cheap and safe
to call from the pytest process. ``pynvml`` is imported inside the functions: its import costs
about 22 ms, which a plain pytest run must not pay.

Known approximation: CUDA's default device order (``CUDA_DEVICE_ORDER=FASTEST_FIRST``) can differ
from NVML's PCI order on machines that mix GPU models; on machines with one model (the usual
training box) the two agree, and this module assumes they do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

from pytest_unsloth.util.units import GIB

# ``nvmlDeviceGetMaxMigDeviceCount`` is at most 7 on current parts; guard against a driver bug
# returning a huge number, since every slot is one NVML call.
_MAX_MIG_SLOTS = 64
_MAX_PROC_NAME = 300


@dataclasses.dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU, as NVML reports it."""

    pid: int
    used_bytes: int | None
    name: str  # from /proc/PID/cmdline when readable, else ""


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    """One physical GPU or one MIG instance, with memory as read when the snapshot was taken."""

    nvml_index: int  # physical NVML index (the parent's for a MIG instance)
    cuda_index: int | None  # index as CUDA in this process sees it; None when hidden
    uuid: str  # "GPU-..." or "MIG-..."
    name: str
    capability: tuple[int, int]
    total_bytes: int
    free_bytes: int
    used_bytes: int
    is_mig: bool  # True for a MIG instance (never for its parent GPU)
    processes: tuple[GpuProcess, ...] = ()
    mig_enabled: bool = False  # a parent GPU in MIG mode: CUDA sees its instances, not it
    parent_uuid: str | None = None  # the physical GPU of a MIG instance
    mig_slot: int | None = None  # the instance's index under its parent (NVML slot)

    @property
    def bf16(self) -> bool:
        """Whether the GPU computes in bfloat16 natively (compute capability 8.0 or newer)."""
        return self.capability >= (8, 0)

    @property
    def label(self) -> str:
        """``cuda:0 (NVIDIA H100 80GB HBM3)``, or ``nvml:3 (NAME)`` when CUDA cannot see it."""
        if self.cuda_index is not None:
            return f"cuda:{self.cuda_index} ({self.name})"
        if self.is_mig and self.mig_slot is not None:
            return f"nvml:{self.nvml_index}/mig:{self.mig_slot} ({self.name})"
        return f"nvml:{self.nvml_index} ({self.name})"


@dataclasses.dataclass(frozen=True)
class NvmlSnapshot:
    """What NVML said at one moment: driver, every physical GPU, and what CUDA here would see."""

    available: bool  # NVML initialised and answered
    error: str | None  # why not, e.g. "NVML Shared Library Not Found" (no driver)
    driver_version: str | None  # "580.159.04"
    cuda_driver_version: int | None  # 13000 for CUDA 13.0
    devices: tuple[GpuDevice, ...]  # every physical GPU, NVML order
    visible: tuple[GpuDevice, ...]  # what CUDA in this process sees, in CUDA order
    cuda_visible_devices: str | None  # raw value of the variable, None when unset
    mig_instances: tuple[GpuDevice, ...] = ()  # every MIG instance, hidden or not

    @property
    def cuda_driver_version_str(self) -> str | None:
        """The driver's CUDA version as text: 13000 -> "13.0", 12040 -> "12.4"."""
        return cuda_version_str(self.cuda_driver_version)


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """What the ``gpu`` fixture returns: the test's GPU, with memory read when it was set up."""

    cuda_index: int  # as the test sees it: torch.device(f"cuda:{cuda_index}")
    nvml_index: int
    uuid: str
    name: str
    capability: tuple[int, int]
    total_bytes: int
    free_bytes: int  # NVML's free memory plus what torch in this process caches unused
    used_bytes: int
    is_mig: bool
    bf16: bool
    driver_version: str | None
    cuda_driver_version: int | None
    torch_cached_bytes: int = 0  # reserved by torch's allocator here but not allocated

    @property
    def device(self) -> str:
        """``"cuda:0"``, ready for ``torch.device`` or ``.to()``."""
        return f"cuda:{self.cuda_index}"

    @property
    def label(self) -> str:
        """``cuda:0 (NVIDIA H100 80GB HBM3)``."""
        return f"cuda:{self.cuda_index} ({self.name})"

    @property
    def total_gib(self) -> float:
        """Total memory in GiB."""
        return self.total_bytes / GIB

    @property
    def free_gib(self) -> float:
        """Free memory in GiB (as read when the fixture was set up)."""
        return self.free_bytes / GIB

    @property
    def cuda_driver_version_str(self) -> str | None:
        """The driver's CUDA version as text ("13.0")."""
        return cuda_version_str(self.cuda_driver_version)

    @classmethod
    def from_device(
        cls, dev: GpuDevice, snap: NvmlSnapshot, *, torch_cached_bytes: int = 0
    ) -> GpuInfo:
        """Combine a visible device with its snapshot's driver facts."""
        if dev.cuda_index is None:
            raise ValueError(f"{dev.label} is not visible to CUDA in this process")
        return cls(
            cuda_index=dev.cuda_index,
            nvml_index=dev.nvml_index,
            uuid=dev.uuid,
            name=dev.name,
            capability=dev.capability,
            total_bytes=dev.total_bytes,
            free_bytes=dev.free_bytes + torch_cached_bytes,
            used_bytes=dev.used_bytes,
            is_mig=dev.is_mig,
            bf16=dev.bf16,
            driver_version=snap.driver_version,
            cuda_driver_version=snap.cuda_driver_version,
            torch_cached_bytes=torch_cached_bytes,
        )


def cuda_version_str(version: int | None) -> str | None:
    """Format an NVML/CUDA integer version (13000 -> "13.0", 12040 -> "12.4")."""
    if version is None:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def format_gib(n_bytes: int) -> str:
    """Bytes as GiB with one decimal: ``format_gib(15_784_000_000) == "14.7 GiB"``."""
    return f"{n_bytes / GIB:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES


def _strtoul(text: str) -> int:
    """The leading non-negative integer of ``text`` as C's strtoul reads it, else -1."""
    digits = ""
    for i, ch in enumerate(text):
        if ch.isdigit() or (i == 0 and ch == "+"):
            digits += ch
        else:
            break
    digits = digits.lstrip("+")
    return int(digits) if digits else -1


def parse_cuda_visible_devices(value: str | None) -> tuple[int | str, ...] | None:
    """Parse ``CUDA_VISIBLE_DEVICES`` the way CUDA reads it.

    Returns None when the variable is unset (every device visible), ``()`` when nothing is
    visible (``""``, ``"-1"``, a first entry that is invalid, or a repeated entry, which CUDA
    treats as an empty set), else the entries in order: ordinals as ``int``, UUIDs (or unique
    prefixes of them) as ``"GPU-..."`` / ``"MIG-..."`` strings. The first entry fixes the kind;
    CUDA stops at the first entry that is invalid or of another kind (``"0,2,x,3"`` is ``(0, 2)``;
    ``"1gpu2"`` reads as ``1`` like strtoul does).
    """
    if value is None:
        return None
    entries: list[int | str] = []
    kind: str | None = None
    for raw in value.split(","):
        elem = raw.strip()
        if elem.startswith(("GPU-", "MIG-")):
            this_kind = elem[:4]
            entry: int | str = elem
        else:
            this_kind = "int"
            number = _strtoul(elem)
            if number < 0:
                break
            entry = number
        if kind is None:
            kind = this_kind
        elif this_kind != kind:
            break
        if entry in entries:
            return ()
        entries.append(entry)
    return tuple(entries)


def _default_enumeration(
    devices: Sequence[GpuDevice], mig_instances: Sequence[GpuDevice]
) -> list[GpuDevice]:
    """What CUDA enumerates with the variable unset: plain GPUs, and MIG parents' instances."""
    order: list[GpuDevice] = []
    for dev in devices:
        if dev.mig_enabled:
            order.extend(m for m in mig_instances if m.parent_uuid == dev.uuid)
        else:
            order.append(dev)
    return order


def _match_prefix(prefix: str, candidates: Sequence[GpuDevice]) -> GpuDevice | None:
    matches = [d for d in candidates if d.uuid.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None  # ambiguous prefixes stop CUDA too


def map_visible(
    entries: tuple[int | str, ...] | None,
    devices: Sequence[GpuDevice],
    mig_instances: Sequence[GpuDevice] = (),
) -> tuple[GpuDevice, ...]:
    """Resolve parsed ``CUDA_VISIBLE_DEVICES`` entries to devices in CUDA order (cuda_index set).

    Ordinals index what CUDA enumerates with the variable unset; ``GPU-`` entries match physical
    GPUs by unique UUID prefix (a MIG-mode GPU stands for its instances); ``MIG-`` entries match
    MIG instances.
    CUDA stops at the first entry that matches nothing and sees nothing when one repeats. As the
    MIG user guide documents for CUDA 11 and 12, one process enumerates at most one MIG instance:
    the first one listed.
    """
    default = _one_mig(_default_enumeration(devices, mig_instances))
    chosen: list[GpuDevice] = []
    if entries is None:
        chosen = default
    else:
        for entry in entries:
            picked: list[GpuDevice]
            if isinstance(entry, int):
                if entry >= len(default):
                    break
                picked = [default[entry]]
            elif entry.startswith("MIG-"):
                found = _match_prefix(entry, mig_instances)
                if found is None:
                    break
                picked = [found]
            else:
                found = _match_prefix(entry, devices)
                if found is None:
                    break
                if found.mig_enabled:
                    picked = [m for m in mig_instances if m.parent_uuid == found.uuid]
                else:
                    picked = [found]
            if any(p.uuid == c.uuid for p in picked for c in chosen):
                return ()
            chosen.extend(picked)
    return tuple(dataclasses.replace(dev, cuda_index=i) for i, dev in enumerate(_one_mig(chosen)))


def _one_mig(devices: Iterable[GpuDevice]) -> list[GpuDevice]:
    """Drop every MIG instance after the first (CUDA enumerates one per process)."""
    result: list[GpuDevice] = []
    seen_mig = False
    for dev in devices:
        if dev.is_mig:
            if seen_mig:
                continue
            seen_mig = True
        result.append(dev)
    return result


# ----------------------------------------------------------------------------------------------
# Reading NVML


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read(4096)
    except OSError:
        return ""
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return text[:_MAX_PROC_NAME]


def _text(value: object) -> str:
    """NVML text as str: old nvidia-ml-py releases return bytes, broken ones None."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _read_processes(nv: ModuleType, handle: Any) -> tuple[GpuProcess, ...]:
    """Compute and graphics processes on one device (deduplicated by pid); () when not allowed."""
    seen: dict[int, GpuProcess] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        fn = getattr(nv, getter, None)
        if fn is None:
            continue
        try:
            infos = list(fn(handle) or ())
        except Exception:
            # Containers and MIG instances often refuse this (NoPermission/NotSupported), and a
            # broken binding may raise anything: the process list only decorates the vram
            # finding, so the inventory goes on without it.
            continue
        for info in infos:
            try:
                pid = int(info.pid)
                used = info.usedGpuMemory
                used = None if used is None else int(used)
            except Exception:
                continue  # an entry of the wrong shape names no process
            if pid not in seen:
                seen[pid] = GpuProcess(
                    pid=pid,
                    used_bytes=used,
                    name=_process_name(pid),
                )
    return tuple(seen.values())


def _read_device(
    nv: ModuleType,
    handle: Any,
    nvml_index: int,
    *,
    with_processes: bool,
    fallback_capability: tuple[int, int] = (0, 0),
) -> GpuDevice:
    """One device's fixed facts and current memory (cuda_index is filled in later)."""
    where = f"GPU {nvml_index}"
    uuid = _text(_call(nv, "nvmlDeviceGetUUID", handle, where=where))
    name = _text(_call(nv, "nvmlDeviceGetName", handle, where=where)) or "unnamed GPU"
    try:
        major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
        capability = (int(major), int(minor))
    except Exception:
        capability = fallback_capability  # MIG instance handles may not answer this
    mem = _call(nv, "nvmlDeviceGetMemoryInfo", handle, where=where)
    processes = _read_processes(nv, handle) if with_processes else ()
    return GpuDevice(
        nvml_index=nvml_index,
        cuda_index=None,
        uuid=uuid,
        name=name,
        capability=capability,
        total_bytes=int(mem.total),
        free_bytes=int(mem.free),
        used_bytes=int(mem.used),
        is_mig=False,
        processes=processes,
    )


def _mig_enabled(nv: ModuleType, handle: Any) -> bool:
    try:
        current, _pending = nv.nvmlDeviceGetMigMode(handle)
    except Exception:
        return False  # NotSupported on GPUs without MIG (or a binding that cannot tell)
    return bool(current == nv.NVML_DEVICE_MIG_ENABLE)


def _read_mig_handles(nv: ModuleType, parent: Any) -> list[tuple[int, Any]]:
    """(slot, handle) of every populated MIG slot under a MIG-mode GPU."""
    try:
        slots = min(int(nv.nvmlDeviceGetMaxMigDeviceCount(parent)), _MAX_MIG_SLOTS)
    except Exception:
        return []
    found = []
    for slot in range(slots):
        try:
            found.append((slot, nv.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)))
        except Exception:
            continue  # NotFound: an empty slot
    return found


@dataclasses.dataclass
class _Handles:
    """NVML handles of one inventory, kept so that memory can be re-read without re-enumerating."""

    by_uuid: dict[str, Any]


def _read_all(
    nv: ModuleType, *, with_processes: bool
) -> tuple[str | None, int | None, list[GpuDevice], list[GpuDevice], _Handles]:
    """Driver versions, physical GPUs and MIG instances.

    Raises NVMLError on a broken driver, NvmlReadError (naming the call) when the binding raises
    anything else or returns something unusable.
    """
    driver = _text(nv.nvmlSystemGetDriverVersion()) or None
    try:
        cuda_driver: int | None = int(nv.nvmlSystemGetCudaDriverVersion())
    except Exception:
        cuda_driver = None
    devices: list[GpuDevice] = []
    migs: list[GpuDevice] = []
    handles: dict[str, Any] = {}
    count = _call(nv, "nvmlDeviceGetCount")
    try:
        count = int(count)
    except Exception:
        raise NvmlReadError(f"nvmlDeviceGetCount returned {count!r}, not a number") from None
    for index in range(count):
        handle = _call(nv, "nvmlDeviceGetHandleByIndex", index, where=f"GPU {index}")
        try:
            dev = _read_device(nv, handle, index, with_processes=with_processes)
        except Exception as exc:
            if isinstance(exc, NvmlReadError) or type(exc).__name__.startswith("NVMLError"):
                raise
            raise NvmlReadError(f"reading GPU {index} failed: {_error_text(exc)}") from None
        if _mig_enabled(nv, handle):
            dev = dataclasses.replace(dev, mig_enabled=True)
            for slot, mig_handle in _read_mig_handles(nv, handle):
                mig = _read_device(
                    nv,
                    mig_handle,
                    index,
                    with_processes=with_processes,
                    fallback_capability=dev.capability,
                )
                mig = dataclasses.replace(mig, is_mig=True, parent_uuid=dev.uuid, mig_slot=slot)
                migs.append(mig)
                handles[mig.uuid] = mig_handle
        devices.append(dev)
        handles[dev.uuid] = handle
    return driver, cuda_driver, devices, migs, _Handles(handles)


class NvmlReadError(Exception):
    """NVML (or the binding) failed while the inventory was read; the text says where."""


def _call(nv: ModuleType, func: str, *args: Any, where: str = "") -> Any:
    """``nv.func(*args)``; an exception other than NVMLError becomes NvmlReadError naming the call.

    NVML's own errors keep their text ("GPU is lost"): that is what users search for.
    """
    try:
        return getattr(nv, func)(*args)
    except Exception as exc:
        if type(exc).__name__.startswith("NVMLError"):
            raise
        at = f" for {where}" if where else ""
        raise NvmlReadError(f"{func}{at} raised {_error_text(exc)}") from None


def _pynvml_origin() -> str:
    """Where ``import pynvml`` would load from, without importing it ("" when unknown)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("pynvml")
    except Exception:
        return ""
    return str(spec.origin) if spec is not None and spec.origin else ""


# Probe threads and the checks import pynvml at the same time; when that import fails, a
# concurrent importer can be handed the half-executed module (CPython's deadlock avoidance), which
# would then be misread as "not nvidia-ml-py". One import at a time.
_IMPORT_LOCK = threading.Lock()


def _import_pynvml() -> ModuleType | str:
    with _IMPORT_LOCK:
        return _import_pynvml_locked()


def _import_pynvml_locked() -> ModuleType | str:
    try:
        import pynvml
    except ImportError as exc:
        if not _pynvml_origin():
            return f"nvidia-ml-py is not installed ({exc}); fix: pip install nvidia-ml-py"
        return _broken_pynvml(exc)
    except Exception as exc:
        # A binding that raises anything else at import (a permission-denied libnvidia-ml, a
        # half-written pynvml.py) must read as "NVML unavailable", never crash the session.
        return _broken_pynvml(exc)
    module: ModuleType = pynvml
    if not isinstance(getattr(module, "NVMLError", None), type) or not callable(
        getattr(module, "nvmlInit", None)
    ):
        where = getattr(module, "__file__", None) or "?"
        return (
            f"the pynvml module at {where} is not nvidia-ml-py (no NVMLError/nvmlInit); fix: "
            "rename or remove that file, then pip install --force-reinstall nvidia-ml-py"
        )
    return module


def _broken_pynvml(exc: BaseException) -> str:
    where = _pynvml_origin()
    at = f" at {where}" if where else ""
    return (
        f"importing nvidia-ml-py (pynvml{at}) raised {_error_text(exc)}; fix: check that this "
        "user can read libnvidia-ml.so (ls -l $(ldconfig -p | grep libnvidia-ml)), then pip "
        "install --force-reinstall nvidia-ml-py"
    )


def _unavailable(error: str, cvd: str | None) -> NvmlSnapshot:
    return NvmlSnapshot(
        available=False,
        error=error,
        driver_version=None,
        cuda_driver_version=None,
        devices=(),
        visible=(),
        cuda_visible_devices=cvd,
    )


def _assemble(
    driver: str | None,
    cuda_driver: int | None,
    devices: Sequence[GpuDevice],
    migs: Sequence[GpuDevice],
    cvd: str | None,
) -> NvmlSnapshot:
    visible = map_visible(parse_cuda_visible_devices(cvd), devices, migs)
    index_of = {d.uuid: d.cuda_index for d in visible}

    def with_index(items: Iterable[GpuDevice]) -> tuple[GpuDevice, ...]:
        return tuple(dataclasses.replace(d, cuda_index=index_of.get(d.uuid)) for d in items)

    return NvmlSnapshot(
        available=True,
        error=None,
        driver_version=driver,
        cuda_driver_version=cuda_driver,
        devices=with_index(devices),
        visible=visible,
        cuda_visible_devices=cvd,
        mig_instances=with_index(migs),
    )


def _error_text(exc: BaseException) -> str:
    """NVML's own words for its errors; ``Type: text`` for anything else."""
    if type(exc).__name__.startswith("NVMLError") or isinstance(exc, NvmlReadError):
        try:
            return str(exc) or type(exc).__name__
        except Exception:  # a broken __str__ (error code missing from the table)
            return type(exc).__name__
    try:
        text = str(exc)
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _shutdown_quietly(nv: ModuleType) -> None:
    # A failing shutdown changes nothing about what was read.
    with contextlib.suppress(Exception):
        nv.nvmlShutdown()


def read_snapshot(
    *, with_processes: bool = False, environ: Mapping[str, str] | None = None
) -> NvmlSnapshot:
    """Read NVML fresh (never cached); never raises: any NVMLError becomes available=False/error."""
    env = os.environ if environ is None else environ
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    nv = _import_pynvml()
    if isinstance(nv, str):
        return _unavailable(nv, cvd)
    try:
        nv.nvmlInit()
    except Exception as exc:
        return _unavailable(_error_text(exc), cvd)
    try:
        driver, cuda_driver, devices, migs, _ = _read_all(nv, with_processes=with_processes)
    except Exception as exc:
        return _unavailable(_error_text(exc), cvd)
    finally:
        _shutdown_quietly(nv)
    return _assemble(driver, cuda_driver, devices, migs, cvd)


def with_memory(snap: NvmlSnapshot, fresh: Mapping[str, tuple[int, int, int]]) -> NvmlSnapshot:
    """``snap`` with (total, free, used) bytes replaced for the devices named in ``fresh``."""
    if not fresh:
        return snap

    def update(items: tuple[GpuDevice, ...]) -> tuple[GpuDevice, ...]:
        out = []
        for d in items:
            if d.uuid in fresh:
                total, free, used = fresh[d.uuid]
                d = dataclasses.replace(d, total_bytes=total, free_bytes=free, used_bytes=used)
            out.append(d)
        return tuple(out)

    return dataclasses.replace(
        snap,
        devices=update(snap.devices),
        visible=update(snap.visible),
        mig_instances=update(snap.mig_instances),
    )


class GpuInventory:
    """A session-long NVML connection: devices enumerated once, memory re-read on demand.

    Markers and fixtures evaluate for every test; re-initialising NVML and re-enumerating each
    time would cost milliseconds per test, while the memory query alone is one cheap call per
    device. Thread-safe; ``close()`` shuts NVML down.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nv: ModuleType | None = None
        self._base: NvmlSnapshot | None = None
        self._handles: _Handles | None = None
        self._static: tuple[str | None, int | None, list[GpuDevice], list[GpuDevice]] | None
        self._static = None
        self._cvd_cache: dict[str | None, NvmlSnapshot] = {}

    def _open(self, cvd: str | None) -> NvmlSnapshot:
        """Enumerate once; return the static snapshot for this value of CUDA_VISIBLE_DEVICES."""
        if self._static is None and self._base is None:
            nv = _import_pynvml()
            if isinstance(nv, str):
                self._base = _unavailable(nv, cvd)
                return self._base
            try:
                nv.nvmlInit()
            except Exception as exc:
                self._base = _unavailable(_error_text(exc), cvd)
                return self._base
            try:
                driver, cuda_driver, devices, migs, handles = _read_all(nv, with_processes=False)
            except Exception as exc:
                self._shutdown(nv)
                self._base = _unavailable(_error_text(exc), cvd)
                return self._base
            self._nv = nv
            self._handles = handles
            self._static = (driver, cuda_driver, devices, migs)
        cached = self._cvd_cache.get(cvd)
        if cached is None:
            if self._static is None:
                assert self._base is not None
                cached = dataclasses.replace(self._base, cuda_visible_devices=cvd)
            else:
                cached = _assemble(*self._static, cvd)
            self._cvd_cache[cvd] = cached
        return cached

    def static(self, environ: Mapping[str, str] | None = None) -> NvmlSnapshot:
        """The inventory as enumerated (memory as read then), mapped for CUDA_VISIBLE_DEVICES now.

        No NVML call after the first: cheap enough to ask for every test.
        """
        env = os.environ if environ is None else environ
        cvd = env.get("CUDA_VISIBLE_DEVICES")
        with self._lock:
            return self._open(cvd)

    def read_memory(self, uuids: Iterable[str]) -> dict[str, tuple[int, int, int]] | str:
        """(total, free, used) bytes read now for each known UUID, or NVML's error text."""
        with self._lock:
            nv, handles = self._nv, self._handles
            if nv is None or handles is None:
                base_error = self._base.error if self._base is not None else None
                return base_error or "NVML is not initialised"
            fresh: dict[str, tuple[int, int, int]] = {}
            try:
                for uuid in uuids:
                    handle = handles.by_uuid.get(uuid)
                    if handle is not None:
                        mem = nv.nvmlDeviceGetMemoryInfo(handle)
                        fresh[uuid] = (int(mem.total), int(mem.free), int(mem.used))
            except Exception as exc:
                if type(exc).__name__.startswith("NVMLError"):
                    return _error_text(exc)
                return f"nvmlDeviceGetMemoryInfo raised {_error_text(exc)}"
            return fresh

    def snapshot(
        self, *, memory_of: Iterable[str] = (), environ: Mapping[str, str] | None = None
    ) -> NvmlSnapshot:
        """The inventory with memory re-read now for the devices whose UUIDs are in ``memory_of``.

        Devices not named keep the memory read at enumeration. An NVML error while re-reading
        (a GPU fell off the bus) makes the snapshot unavailable with that error.
        """
        snap = self.static(environ)
        wanted = set(memory_of)
        if not snap.available or not wanted:
            return snap
        fresh = self.read_memory(wanted)
        if isinstance(fresh, str):
            return _unavailable(fresh, snap.cuda_visible_devices)
        return with_memory(snap, fresh)

    @staticmethod
    def _shutdown(nv: ModuleType) -> None:
        _shutdown_quietly(nv)

    def close(self) -> None:
        """Shut NVML down if this inventory initialised it."""
        with self._lock:
            if self._nv is not None:
                self._shutdown(self._nv)
            self._nv = None
            self._handles = None
            self._static = None
            self._base = None
            self._cvd_cache.clear()
