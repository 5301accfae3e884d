"""A fake ``pynvml`` (nvidia-ml-py) for tests on machines without an NVIDIA GPU.

Imitates the observable API of the real module: the same function names, return shapes and the
``NVMLError`` hierarchy (``NVMLError(12)`` is an ``NVMLError_LibraryNotFound`` whose text is
"NVML Shared Library Not Found"). The inventory comes from the JSON file named by
``PYTEST_UNSLOTH_FAKE_NVML``, read again whenever the file changes, so a test can change free
memory between evaluations (the ``fake_nvml`` fixture writes a new file for every update, which
also reaches child processes through the environment).

Spec (every key optional)::

    {"no_driver": false,            # true: nvmlInit raises NVMLError_LibraryNotFound
     "init_error": "DriverNotLoaded",  # any NVMLError_<Name> suffix raised by nvmlInit
     "driver": "580.159.04", "cuda_driver": 13000,
     "gpus": [{"name": "NVIDIA L4", "uuid": "GPU-...", "capability": [8, 9],
               "total_gib": 22.5, "free_gib": 14.7,        # or total_bytes / free_bytes
               "processes": [{"pid": 1234, "used_gib": 7.8}],  # or used_bytes (null allowed)
               "mig_capable": false,   # nvmlDeviceGetMigMode answers [0, 0] instead of NotSupported
               "mig": [{"name": "...", "uuid": "MIG-...", "total_gib": 9.8, "free_gib": 9.5,
                        "slot": 0}],   # present (even empty): MIG mode is on
               "errors": {"nvmlDeviceGetMemoryInfo": "GpuIsLost"},  # per-function failures
               "returns": {"nvmlDeviceGetName": {"bytes": "NVIDIA L4"}}}],  # odd return values
     "errors": {"nvmlDeviceGetCount": "py:RuntimeError: boom"},  # system-level failures
     "returns": {"nvmlSystemGetDriverVersion": null}}

An error is an ``NVMLError_<Name>`` suffix or ``py:ExceptionType: text`` for a Python exception
of a builtin type (what a broken binding raises). A ``returns`` value replaces the function's
result as is; ``{"bytes": "text"}`` stands for ``b"text"`` (old bindings return bytes).
``PYTEST_UNSLOTH_FAKE_NVML_IMPORT_ERROR=OSError: text`` makes ``import pynvml`` itself raise.

Machine-level keys (the topology check reads them; every one optional)::

    per GPU: "persistence": true, "compute_mode": 0 (NVML_COMPUTEMODE_*), "nvlinks": 18
             (active links; absent: NvLink NotSupported), "nvlink_total": 18,
             "retired_pending": false, "remapped_rows": [corr, unc, pending, failure]
             (absent: NotSupported), "ecc_volatile_uncorrected": 0, "throttle": 0x40
             (clock event reason bits)
    top level: "links": {"0,1": {"level": 10, "p2p": {"read": 0, "write": 0, "nvlink": 0}},
                         "1,0": {...}}   # directional; a missing "b,a" mirrors "a,b";
             a pair without an entry: level 50 (SYS), every P2P status 5 (not supported)
"""

from __future__ import annotations

import json
import os
import string
import sys
import threading
from typing import Any

SPEC_ENV = "PYTEST_UNSLOTH_FAKE_NVML"
IMPORT_ERROR_ENV = "PYTEST_UNSLOTH_FAKE_NVML_IMPORT_ERROR"
_GIB = 1024**3


def _python_error(text: str) -> BaseException:
    """``"OSError: text"`` -> ``OSError("text")`` (builtin exception types only)."""
    import builtins

    kind, _, message = text.partition(":")
    cls = getattr(builtins, kind.strip(), None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise ValueError(f"fake NVML: {kind!r} is not a builtin exception type")
    return cls(message.strip())


if os.environ.get(IMPORT_ERROR_ENV):
    raise _python_error(os.environ[IMPORT_ERROR_ENV])

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

NVML_DEVICE_MIG_DISABLE = 0x0
NVML_DEVICE_MIG_ENABLE = 0x1

# Counters tests can read to prove batching ("how many times was NVML initialised?").
CALLS: dict[str, int] = {}
_refcount = 0
_lock = threading.Lock()


class NVMLError(Exception):
    """Same contract as the real class: ``NVMLError(code)`` builds the matching subclass."""

    _valClassMapping: dict[int, type[NVMLError]] = {}  # noqa: RUF012 (mirrors the real module)
    _errcode_to_string = {  # noqa: RUF012
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
        NVML_ERROR_NOT_FOUND: "Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
        NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_TIMEOUT: "Timeout",
        NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
        NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
        NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
        NVML_ERROR_MEMORY: "Insufficient Memory",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }
    value: int

    def __new__(cls, value: int = NVML_ERROR_UNKNOWN) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return self._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)


def _make_error_classes() -> None:
    module = sys.modules[__name__]
    for attr in [a for a in dir(module) if a.startswith("NVML_ERROR_")]:
        class_name = "NVMLError_" + string.capwords(attr.replace("NVML_ERROR_", ""), "_").replace(
            "_", ""
        )
        code = getattr(module, attr)

        def make_new(val: int) -> Any:
            def new(klass: type[NVMLError], *args: object) -> NVMLError:
                return NVMLError.__new__(klass, val)

            return new

        cls = type(class_name, (NVMLError,), {"__new__": make_new(code)})
        cls.__module__ = __name__
        setattr(module, class_name, cls)
        NVMLError._valClassMapping[code] = cls


_make_error_classes()
NVMLError_LibraryNotFound: type[NVMLError]
NVMLError_NotSupported: type[NVMLError]
NVMLError_NotFound: type[NVMLError]
NVMLError_Uninitialized: type[NVMLError]


def _error_by_name(name: str) -> BaseException:
    if name.startswith("py:"):
        return _python_error(name[3:])
    cls = getattr(sys.modules[__name__], "NVMLError_" + name, None)
    if cls is None:
        raise ValueError(f"fake NVML spec names an unknown error {name!r}")
    error: NVMLError = cls()
    return error


class c_nvmlMemory_t:
    """Like the ctypes structure: ``.total``, ``.free``, ``.used`` in bytes."""

    def __init__(self, total: int, free: int, used: int) -> None:
        self.total = total
        self.free = free
        self.used = used

    def __repr__(self) -> str:
        return f"c_nvmlMemory_t(total: {self.total} B, free: {self.free} B, used: {self.used} B)"


class nvmlFriendlyObject:
    """Like the real process-info object: ``.pid``, ``.usedGpuMemory`` (None when unknown)."""

    def __init__(self, dictionary: dict[str, Any]) -> None:
        for key, value in dictionary.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return repr(self.__dict__)


class c_nvmlDevice_t:
    """An opaque handle: a GPU index and, for a MIG instance, the slot under it."""

    def __init__(self, gpu: int, mig_slot: int | None = None) -> None:
        self.gpu = gpu
        self.mig_slot = mig_slot

    def __repr__(self) -> str:
        return f"<fake nvml handle gpu={self.gpu} mig={self.mig_slot}>"


# ----------------------------------------------------------------------------------------------
# Spec loading

_cache: dict[str, Any] = {"key": None, "spec": None}


def _load() -> dict[str, Any]:
    path = os.environ.get(SPEC_ENV)
    if not path:
        return {"no_driver": True}
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    if _cache["key"] != key:
        with open(path, encoding="utf-8") as fh:
            _cache["spec"] = json.load(fh)
        _cache["key"] = key
    spec: dict[str, Any] = _cache["spec"]
    return spec


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


_NO_OVERRIDE = object()


def _returned(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"bytes"}:
        return str(value["bytes"]).encode()
    return value


def _system(func: str) -> Any:
    """Raise the spec's top-level failure for ``func``, or return its override (or a marker)."""
    spec = _load()
    error = spec.get("errors", {}).get(func)
    if error:
        raise _error_by_name(error)
    returns = spec.get("returns", {})
    return _returned(returns[func]) if func in returns else _NO_OVERRIDE


def _override(entry: dict[str, Any], func: str) -> Any:
    returns = entry.get("returns", {})
    return _returned(returns[func]) if func in returns else _NO_OVERRIDE


def _require_init() -> dict[str, Any]:
    if _refcount <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _load()


def _bytes(entry: dict[str, Any], key: str, default: int | None = None) -> int | None:
    if key + "_bytes" in entry:
        value = entry[key + "_bytes"]
        return None if value is None else int(value)
    if key + "_gib" in entry:
        value = entry[key + "_gib"]
        return None if value is None else int(float(value) * _GIB)
    return default


def _gpu(spec: dict[str, Any], index: int) -> dict[str, Any]:
    gpus: list[dict[str, Any]] = spec.get("gpus", [])
    if not 0 <= index < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return gpus[index]


def _entry(spec: dict[str, Any], handle: c_nvmlDevice_t, func: str) -> dict[str, Any]:
    """The spec entry for a handle, raising the failure the spec injects for ``func``."""
    if not isinstance(handle, c_nvmlDevice_t):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    gpu = _gpu(spec, handle.gpu)
    entry = gpu
    if handle.mig_slot is not None:
        found = [m for m in _mig_list(gpu) if m["slot"] == handle.mig_slot]
        if not found:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        entry = found[0]
    error = entry.get("errors", {}).get(func)
    if error:
        raise _error_by_name(error)
    return entry


def _mig_list(gpu: dict[str, Any]) -> list[dict[str, Any]]:
    migs = gpu.get("mig")
    if migs is None:
        return []
    out = []
    for i, m in enumerate(migs):
        m = dict(m)
        m.setdefault("slot", i)
        out.append(m)
    return out


def _default_uuid(index: int, mig_slot: int | None = None) -> str:
    if mig_slot is None:
        return f"GPU-{index:08x}-0000-4000-8000-{index:012x}"
    return f"MIG-{index:08x}-{mig_slot:04x}-4000-8000-{index:012x}"


# ----------------------------------------------------------------------------------------------
# The API


def nvmlInit() -> None:
    """Initialise, or raise what a machine without a driver raises."""
    global _refcount
    _count("nvmlInit")
    spec = _load()
    if spec.get("no_driver"):
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    if spec.get("init_error"):
        raise _error_by_name(spec["init_error"])
    _system("nvmlInit")
    with _lock:
        _refcount += 1


def nvmlInitWithFlags(flags: int) -> None:
    """Same as nvmlInit (flags ignored)."""
    nvmlInit()


def nvmlShutdown() -> None:
    """Drop one reference; raise Uninitialized when none is held, as the library does."""
    global _refcount
    _count("nvmlShutdown")
    if _system("nvmlShutdown") is not _NO_OVERRIDE:
        return
    with _lock:
        if _refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _refcount -= 1


def nvmlSystemGetDriverVersion() -> str:
    """Driver version string."""
    _count("nvmlSystemGetDriverVersion")
    spec = _require_init()
    override = _system("nvmlSystemGetDriverVersion")
    if override is not _NO_OVERRIDE:
        return override  # type: ignore[no-any-return]
    return str(spec.get("driver", "580.159.04"))


def nvmlSystemGetCudaDriverVersion() -> int:
    """The driver's CUDA version as an integer (13000 for 13.0)."""
    _count("nvmlSystemGetCudaDriverVersion")
    spec = _require_init()
    override = _system("nvmlSystemGetCudaDriverVersion")
    if override is not _NO_OVERRIDE:
        return override  # type: ignore[no-any-return]
    return int(spec.get("cuda_driver", 13000))


nvmlSystemGetCudaDriverVersion_v2 = nvmlSystemGetCudaDriverVersion


def nvmlSystemGetProcessName(pid: int) -> str:
    """The process's name (from the spec, else empty)."""
    spec = _require_init()
    for gpu in spec.get("gpus", []):
        for proc in gpu.get("processes", []):
            if proc.get("pid") == pid:
                return str(proc.get("name", ""))
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetCount() -> int:
    """Number of physical GPUs."""
    _count("nvmlDeviceGetCount")
    spec = _require_init()
    override = _system("nvmlDeviceGetCount")
    if override is not _NO_OVERRIDE:
        return override  # type: ignore[no-any-return]
    return len(spec.get("gpus", []))


def nvmlDeviceGetHandleByIndex(index: int) -> c_nvmlDevice_t:
    """Handle of physical GPU ``index``."""
    _count("nvmlDeviceGetHandleByIndex")
    gpu = _gpu(_require_init(), index)
    error = gpu.get("errors", {}).get("nvmlDeviceGetHandleByIndex")
    if error:
        raise _error_by_name(error)
    return c_nvmlDevice_t(index)


def nvmlDeviceGetHandleByUUID(uuid: str) -> c_nvmlDevice_t:
    """Handle of the GPU or MIG instance with this UUID."""
    spec = _require_init()
    for i, gpu in enumerate(spec.get("gpus", [])):
        if gpu.get("uuid", _default_uuid(i)) == uuid:
            return c_nvmlDevice_t(i)
        for m in _mig_list(gpu):
            if m.get("uuid", _default_uuid(i, m["slot"])) == uuid:
                return c_nvmlDevice_t(i, m["slot"])
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetIndex(handle: c_nvmlDevice_t) -> int:
    """Physical index of a GPU handle."""
    _entry(_require_init(), handle, "nvmlDeviceGetIndex")
    return handle.gpu


def nvmlDeviceGetName(handle: c_nvmlDevice_t) -> str:
    """Marketing name (a MIG instance gets "PARENT MIG <profile>" unless the spec names it)."""
    _count("nvmlDeviceGetName")
    spec = _require_init()
    entry = _entry(spec, handle, "nvmlDeviceGetName")
    override = _override(entry, "nvmlDeviceGetName")
    if override is not _NO_OVERRIDE:
        return override  # type: ignore[no-any-return]
    if handle.mig_slot is not None and "name" not in entry:
        parent = _gpu(spec, handle.gpu).get("name", "NVIDIA A100-SXM4-80GB")
        return f"{parent} MIG 1g.10gb"
    return str(entry.get("name", "NVIDIA A100-SXM4-80GB"))


def nvmlDeviceGetUUID(handle: c_nvmlDevice_t) -> str:
    """``GPU-...`` or ``MIG-...``."""
    _count("nvmlDeviceGetUUID")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetUUID")
    override = _override(entry, "nvmlDeviceGetUUID")
    if override is not _NO_OVERRIDE:
        return override  # type: ignore[no-any-return]
    return str(entry.get("uuid", _default_uuid(handle.gpu, handle.mig_slot)))


def nvmlDeviceGetCudaComputeCapability(handle: c_nvmlDevice_t) -> tuple[int, int]:
    """(major, minor); a MIG instance inherits its parent's unless the spec sets one."""
    _count("nvmlDeviceGetCudaComputeCapability")
    spec = _require_init()
    entry = _entry(spec, handle, "nvmlDeviceGetCudaComputeCapability")
    cap = entry.get("capability") or _gpu(spec, handle.gpu).get("capability", [8, 0])
    return (int(cap[0]), int(cap[1]))


def nvmlDeviceGetMemoryInfo(handle: c_nvmlDevice_t, version: int | None = None) -> c_nvmlMemory_t:
    """Total/free/used bytes; used defaults to total - free."""
    _count("nvmlDeviceGetMemoryInfo")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetMemoryInfo")
    override = _override(entry, "nvmlDeviceGetMemoryInfo")
    if override is not _NO_OVERRIDE:
        return override  # type: ignore[no-any-return]
    total = _bytes(entry, "total", 80 * _GIB) or 0
    free = _bytes(entry, "free", total)
    free = total if free is None else free
    used = _bytes(entry, "used", total - free)
    return c_nvmlMemory_t(total, free, total - free if used is None else used)


def _procs(handle: c_nvmlDevice_t, key: str, func: str) -> list[nvmlFriendlyObject]:
    entry = _entry(_require_init(), handle, func)
    override = _override(entry, func)
    if override is not _NO_OVERRIDE:
        return override  # type: ignore[no-any-return]
    out = []
    for p in entry.get(key, []):
        used = _bytes(p, "used", None)
        out.append(
            nvmlFriendlyObject(
                {
                    "pid": int(p["pid"]),
                    "usedGpuMemory": used,
                    "gpuInstanceId": 0xFFFFFFFF,
                    "computeInstanceId": 0xFFFFFFFF,
                }
            )
        )
    return out


def nvmlDeviceGetComputeRunningProcesses(handle: c_nvmlDevice_t) -> list[nvmlFriendlyObject]:
    """Compute processes on the device (spec ``processes``)."""
    _count("nvmlDeviceGetComputeRunningProcesses")
    return _procs(handle, "processes", "nvmlDeviceGetComputeRunningProcesses")


def nvmlDeviceGetGraphicsRunningProcesses(handle: c_nvmlDevice_t) -> list[nvmlFriendlyObject]:
    """Graphics processes on the device (spec ``graphics_processes``)."""
    _count("nvmlDeviceGetGraphicsRunningProcesses")
    return _procs(handle, "graphics_processes", "nvmlDeviceGetGraphicsRunningProcesses")


nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses
nvmlDeviceGetComputeRunningProcesses_v2 = nvmlDeviceGetComputeRunningProcesses
nvmlDeviceGetGraphicsRunningProcesses_v3 = nvmlDeviceGetGraphicsRunningProcesses
nvmlDeviceGetGraphicsRunningProcesses_v2 = nvmlDeviceGetGraphicsRunningProcesses


def nvmlDeviceGetMigMode(handle: c_nvmlDevice_t) -> list[int]:
    """[current, pending]; NotSupported on a GPU without MIG, as real non-MIG parts answer."""
    _count("nvmlDeviceGetMigMode")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetMigMode")
    if handle.mig_slot is not None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if "mig" in entry and entry["mig"] is not None:
        return [NVML_DEVICE_MIG_ENABLE, NVML_DEVICE_MIG_ENABLE]
    if entry.get("mig_capable"):
        return [NVML_DEVICE_MIG_DISABLE, NVML_DEVICE_MIG_DISABLE]
    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)


def nvmlDeviceIsMigDeviceHandle(handle: c_nvmlDevice_t) -> bool:
    """Whether the handle is a MIG instance."""
    _require_init()
    return handle.mig_slot is not None


def nvmlDeviceGetMaxMigDeviceCount(handle: c_nvmlDevice_t) -> int:
    """Slots under a MIG-mode GPU (7, or enough for the spec's slots); 0 otherwise."""
    _count("nvmlDeviceGetMaxMigDeviceCount")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetMaxMigDeviceCount")
    migs = _mig_list(entry)
    if entry.get("mig") is None:
        return 0
    return max([7] + [int(m["slot"]) + 1 for m in migs])


def nvmlDeviceGetMigDeviceHandleByIndex(handle: c_nvmlDevice_t, index: int) -> c_nvmlDevice_t:
    """Handle of the MIG instance in slot ``index``; NotFound for an empty slot."""
    _count("nvmlDeviceGetMigDeviceHandleByIndex")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetMigDeviceHandleByIndex")
    if any(m["slot"] == index for m in _mig_list(entry)):
        return c_nvmlDevice_t(handle.gpu, index)
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle: c_nvmlDevice_t) -> c_nvmlDevice_t:
    """Parent GPU of a MIG instance."""
    _require_init()
    if handle.mig_slot is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return c_nvmlDevice_t(handle.gpu)


def nvmlErrorString(result: int) -> str:
    """Text of an error code."""
    return str(NVMLError(result))


# ----------------------------------------------------------------------------------------------
# Machine-level answers: topology, P2P, NvLink, persistence/compute mode, ECC, clock events.

NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_COMPUTEMODE_DEFAULT = 0
NVML_COMPUTEMODE_EXCLUSIVE_THREAD = 1
NVML_COMPUTEMODE_PROHIBITED = 2
NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 3
NVML_NVLINK_MAX_LINKS = 36
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_TOPOLOGY_INTERNAL = 0
NVML_TOPOLOGY_SINGLE = 10
NVML_TOPOLOGY_MULTIPLE = 20
NVML_TOPOLOGY_HOSTBRIDGE = 30
NVML_TOPOLOGY_NODE = 40
NVML_TOPOLOGY_SYSTEM = 50
# The real module has a stray comma here: the constant is a 1-tuple, which ctypes refuses.
NVML_P2P_CAPS_INDEX_READ = (0,)
NVML_P2P_CAPS_INDEX_WRITE = 1
NVML_P2P_CAPS_INDEX_NVLINK = 2
NVML_P2P_CAPS_INDEX_ATOMICS = 3
NVML_P2P_CAPS_INDEX_PCI = 4
NVML_P2P_STATUS_OK = 0
NVML_P2P_STATUS_CHIPSET_NOT_SUPPORTED = 1
NVML_P2P_STATUS_GPU_NOT_SUPPORTED = 2
NVML_P2P_STATUS_IOH_TOPOLOGY_NOT_SUPPORTED = 3
NVML_P2P_STATUS_DISABLED_BY_REGKEY = 4
NVML_P2P_STATUS_NOT_SUPPORTED = 5
NVML_P2P_STATUS_UNKNOWN = 6
nvmlClocksEventReasonGpuIdle = 0x1
nvmlClocksEventReasonApplicationsClocksSetting = 0x2
nvmlClocksEventReasonSwPowerCap = 0x4
nvmlClocksEventReasonHwSlowdown = 0x8
nvmlClocksEventReasonSyncBoost = 0x10
nvmlClocksEventReasonSwThermalSlowdown = 0x20
nvmlClocksEventReasonHwThermalSlowdown = 0x40
nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80
nvmlClocksEventReasonDisplayClockSetting = 0x100
nvmlClocksThrottleReasonGpuIdle = 0x1
nvmlClocksThrottleReasonSwPowerCap = 0x4
nvmlClocksThrottleReasonHwSlowdown = 0x8
nvmlClocksThrottleReasonSwThermalSlowdown = 0x20
nvmlClocksThrottleReasonHwThermalSlowdown = 0x40
nvmlClocksThrottleReasonHwPowerBrakeSlowdown = 0x80
_P2P_KEYS = {0: "read", 1: "write", 2: "nvlink", 3: "atomics", 4: "pci"}


def _c_uint(value: object) -> int:
    """What ctypes accepts for a c_uint argument: an int, else ArgumentError (like the real)."""
    import ctypes

    if isinstance(value, bool) or not isinstance(value, int):
        raise ctypes.ArgumentError(f"argument 3: TypeError: Don't know how to convert {value!r}")
    return value


def _link(spec: dict[str, Any], a: c_nvmlDevice_t, b: c_nvmlDevice_t) -> dict[str, Any]:
    links: dict[str, Any] = spec.get("links", {})
    entry = links.get(f"{a.gpu},{b.gpu}") or links.get(f"{b.gpu},{a.gpu}")
    return dict(entry or {})


def nvmlDeviceGetTopologyCommonAncestor(device1: c_nvmlDevice_t, device2: c_nvmlDevice_t) -> int:
    """NVML_TOPOLOGY_* level of the closest common ancestor of two GPUs."""
    _count("nvmlDeviceGetTopologyCommonAncestor")
    spec = _require_init()
    _entry(spec, device1, "nvmlDeviceGetTopologyCommonAncestor")
    _entry(spec, device2, "nvmlDeviceGetTopologyCommonAncestor")
    if device1.gpu == device2.gpu:
        return NVML_TOPOLOGY_INTERNAL
    return int(_link(spec, device1, device2).get("level", NVML_TOPOLOGY_SYSTEM))


def nvmlDeviceGetP2PStatus(device1: c_nvmlDevice_t, device2: c_nvmlDevice_t, p2pIndex: int) -> int:
    """NVML_P2P_STATUS_* from device1 to device2 for one capability (directional)."""
    _count("nvmlDeviceGetP2PStatus")
    index = _c_uint(p2pIndex)
    spec = _require_init()
    _entry(spec, device1, "nvmlDeviceGetP2PStatus")
    _entry(spec, device2, "nvmlDeviceGetP2PStatus")
    if index not in _P2P_KEYS:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    p2p = _link(spec, device1, device2).get("p2p", {})
    return int(p2p.get(_P2P_KEYS[index], NVML_P2P_STATUS_NOT_SUPPORTED))


def nvmlDeviceGetNvLinkState(device: c_nvmlDevice_t, link: int) -> int:
    """1 when the link is active; NotSupported without NVLink, InvalidArgument past the last."""
    _count("nvmlDeviceGetNvLinkState")
    entry = _entry(_require_init(), device, "nvmlDeviceGetNvLinkState")
    if "nvlinks" not in entry:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    active = int(entry["nvlinks"])
    total = int(entry.get("nvlink_total", active))
    if not 0 <= _c_uint(link) < total:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return NVML_FEATURE_ENABLED if link < active else NVML_FEATURE_DISABLED


def nvmlDeviceGetPersistenceMode(handle: c_nvmlDevice_t) -> int:
    """NVML_FEATURE_ENABLED/DISABLED (default enabled)."""
    _count("nvmlDeviceGetPersistenceMode")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetPersistenceMode")
    return NVML_FEATURE_ENABLED if entry.get("persistence", True) else NVML_FEATURE_DISABLED


def nvmlDeviceGetComputeMode(handle: c_nvmlDevice_t) -> int:
    """NVML_COMPUTEMODE_* (default DEFAULT)."""
    _count("nvmlDeviceGetComputeMode")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetComputeMode")
    return int(entry.get("compute_mode", NVML_COMPUTEMODE_DEFAULT))


def nvmlDeviceGetRetiredPagesPendingStatus(device: c_nvmlDevice_t) -> int:
    """1 when retired pages wait for a reset (pre-Ampere ECC page retirement)."""
    _count("nvmlDeviceGetRetiredPagesPendingStatus")
    entry = _entry(_require_init(), device, "nvmlDeviceGetRetiredPagesPendingStatus")
    return NVML_FEATURE_ENABLED if entry.get("retired_pending") else NVML_FEATURE_DISABLED


def nvmlDeviceGetRemappedRows(device: c_nvmlDevice_t) -> tuple[int, int, int, int]:
    """(corrected rows, uncorrected rows, remap pending, remap failed); Ampere and newer."""
    _count("nvmlDeviceGetRemappedRows")
    entry = _entry(_require_init(), device, "nvmlDeviceGetRemappedRows")
    rows = entry.get("remapped_rows")
    if rows is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    corr, unc, pending, failure = (int(v) for v in rows)
    return (corr, unc, pending, failure)


def nvmlDeviceGetTotalEccErrors(handle: c_nvmlDevice_t, errorType: int, counterType: int) -> int:
    """ECC error count; the spec sets the volatile uncorrected one."""
    _count("nvmlDeviceGetTotalEccErrors")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetTotalEccErrors")
    if (errorType, counterType) == (NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC):
        return int(entry.get("ecc_volatile_uncorrected", 0))
    return 0


def nvmlDeviceGetCurrentClocksEventReasons(handle: c_nvmlDevice_t) -> int:
    """Bit mask of why clocks are below their maximum right now."""
    _count("nvmlDeviceGetCurrentClocksEventReasons")
    entry = _entry(_require_init(), handle, "nvmlDeviceGetCurrentClocksEventReasons")
    return int(entry.get("throttle", 0))


nvmlDeviceGetCurrentClocksThrottleReasons = nvmlDeviceGetCurrentClocksEventReasons
