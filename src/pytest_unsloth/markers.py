"""The ``requires_*`` markers: their signatures and their evaluation.

Registered as a plugin by ``plugin.py`` at configure time. Markers are validated by binding their
arguments to small signature functions (a bad keyword names itself) and evaluated in a ``tryfirst``
``pytest_runtest_setup``, in the manner of pytest's own skipping plugin: misuse errors that one
test (``pytest.fail(..., pytrace=False)``), a missing resource skips it with the numbers. Nothing
is evaluated at collection: NVML is read when a test sets up (enumerated once per session, memory
re-read per evaluation), kernel probes run in subprocesses on first need.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import sys
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from pytest_unsloth.gpu import (
    GpuDevice,
    GpuInventory,
    NvmlSnapshot,
    format_gib,
)
from pytest_unsloth.pinning import PIN_KEY
from pytest_unsloth.probes.table import KERNEL_HELP_NAMES
from pytest_unsloth.util.units import GIB, MIB

if TYPE_CHECKING:
    from pytest_unsloth.probes.protocol import ProbeResult

# What a kernel name in requires_kernel really asks for, where "a working NAME" would mislead:
# the torch probe runs a tensor op on each GPU, so a working CPU torch does not satisfy it.
KERNEL_NEEDS = {"torch": "torch running on a CUDA GPU (requires_kernel('torch') probes CUDA)"}

# One line per marker, shaped like its signature; ``pytest --markers`` shows them.
MARKER_HELP = {
    "requires_vram": (
        "requires_vram(amount, *, free=True, device=None, total_across=False): skip unless the "
        "GPU has `amount` of memory free when the test starts (free=False: in total). amount is "
        "a number of GiB (16, 7.5) or a string with a unit: binary '16GiB', '16000MiB' "
        "(1 GiB = 2**30 bytes) or decimal '16GB', '16000MB' (1 GB = 10**9 bytes, as GPU "
        "vendors count, so an '80GB' card has it). device: CUDA index as the test sees it "
        "(default 0); total_across=True sums every visible GPU. --unsloth-strict-skips fails "
        "instead of skipping."
    ),
    "requires_kernel": (
        "requires_kernel(*names): skip unless every named kernel probe passes here (names: "
        f"{KERNEL_HELP_NAMES}); every probe "
        "runs on the GPU, so 'torch' means torch runs a CUDA tensor op (a CPU-only machine "
        "skips); each probe runs once per session in a subprocess, with the probe's own message "
        "as the skip reason. "
        "--unsloth-strict-skips fails instead of skipping."
    ),
    "requires_gpu": (
        "requires_gpu(count=1, *, capability=None): skip unless at least `count` GPUs are visible "
        "to CUDA, each with compute capability >= capability ((8, 0) or '8.0') when given. "
        "--unsloth-strict-skips fails instead of skipping."
    ),
    "requires_fit": (
        "requires_fit(model, *, device=None, **settings): skip unless the GPU (CUDA index "
        "device, default 0) has the estimated peak memory of one training step free: model is a "
        "config.json, a model folder or a cached Hub id; settings are python -m "
        "pytest_unsloth.fit's (task='grpo', num_generations=8, load_in_4bit=True, ...). The skip "
        "gives the estimate by part and the free memory. --unsloth-strict-skips fails instead."
    ),
    "requires_bf16": (
        "requires_bf16: skip unless the test's GPU (cuda:0) computes in bfloat16 (compute "
        "capability 8.0 or newer). --unsloth-strict-skips fails instead of skipping."
    ),
}
MARKER_NAMES = frozenset(MARKER_HELP)

INVENTORY_KEY = pytest.StashKey[GpuInventory]()
# Per item: a requires_* marker or the gpu fixture skipped it (the report points at the test).
SKIPPED_HERE_KEY = pytest.StashKey[bool]()
# Per session: id(mark) -> (mark, its requirement or the misuse message).
VALIDATED_KEY = pytest.StashKey["dict[int, tuple[pytest.Mark, Requirement | str]]"]()


class MarkerUsageError(Exception):
    """A marker was written wrongly: the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Signatures: binding the marker's arguments to these names a bad keyword for us.


def _sig_requires_vram(
    amount: object, *, free: object = True, device: object = None, total_across: object = False
) -> None: ...


def _sig_requires_kernel(*names: object) -> None: ...


def _sig_requires_gpu(count: object = 1, *, capability: object = None) -> None: ...


def _sig_requires_bf16() -> None: ...


def _sig_requires_fit(model: object, *, device: object = None, **settings: object) -> None: ...


_SIGNATURES: dict[str, Callable[..., None]] = {
    "requires_vram": _sig_requires_vram,
    "requires_kernel": _sig_requires_kernel,
    "requires_gpu": _sig_requires_gpu,
    "requires_bf16": _sig_requires_bf16,
    "requires_fit": _sig_requires_fit,
}


@dataclasses.dataclass(frozen=True)
class VramRequirement:
    """``requires_vram`` after validation."""

    amount_bytes: int
    amount_text: str  # as the user wrote it, for the skip reason
    free: bool
    device: int
    total_across: bool


@dataclasses.dataclass(frozen=True)
class KernelRequirement:
    """``requires_kernel`` after validation (names normalised to probe names)."""

    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GpuRequirement:
    """``requires_gpu`` after validation."""

    count: int
    capability: tuple[int, int] | None


@dataclasses.dataclass(frozen=True)
class Bf16Requirement:
    """``requires_bf16``."""


@dataclasses.dataclass(frozen=True)
class FitRequirement:
    """``requires_fit`` after validation: the estimate, computed once per marker."""

    model: str
    device: int
    total_bytes: int
    summary: str


Requirement = (
    VramRequirement | KernelRequirement | GpuRequirement | Bf16Requirement | FitRequirement
)


def _signature_text(name: str) -> str:
    sig = inspect.signature(_SIGNATURES[name])
    bare = sig.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    return name + str(bare)


def _call_text(mark: pytest.Mark) -> str:
    parts = [_short_repr(a) for a in mark.args]
    parts += [f"{k}={_short_repr(v)}" for k, v in mark.kwargs.items()]
    return f"@pytest.mark.{mark.name}({', '.join(parts)})"


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # a user object with a broken __repr__ must not break the message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _bool_arg(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise MarkerUsageError(f"{key}={_short_repr(value)} is not True or False")
    return value


def parse_amount(value: object) -> int:
    """Bytes for a ``requires_vram`` amount: a number of GiB, or a string with a unit.

    Binary units (KiB, MiB, GiB, TiB) count powers of 1024; decimal ones (KB, MB, GB, TB) powers
    of 1000, as GPU vendors do; a bare number (or a string without a unit) is GiB. Raises
    MarkerUsageError for anything else, negative or not finite.
    """
    from pytest_unsloth.settings import parse_amount_bytes

    bad_number = (isinstance(value, int) and not isinstance(value, bool) and value < 0) or (
        isinstance(value, float) and not (math.isfinite(value) and value >= 0)
    )
    if bad_number:
        raise MarkerUsageError(
            f"amount {_short_repr(value)} is not a non-negative, finite number of GiB"
        )
    try:
        return parse_amount_bytes(value)
    except (ValueError, OverflowError, TypeError):
        raise MarkerUsageError(
            f"amount {_short_repr(value)} is not an amount of memory: pass a number of GiB (16) "
            "or a string with a unit ('16GiB', '16000MiB', '16GB')"
        ) from None


def _device_arg(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        text = text.removeprefix("cuda:")
        if text.isdigit() and text.isascii():
            return int(text)
    raise MarkerUsageError(
        f"device={_short_repr(value)} is not a CUDA device index: pass 0, 1, ... or 'cuda:1' "
        "(the index as the test sees it, after CUDA_VISIBLE_DEVICES)"
    )


def _capability_arg(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    parts: Sequence[object] | None = None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        parts = value
    elif isinstance(value, str) and value.strip().count(".") == 1:
        parts = value.strip().split(".")
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = (value, 0)
    if parts is not None:
        try:
            major, minor = (int(p) for p in parts)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            pass
        else:
            if (
                0 <= major < 100
                and 0 <= minor < 100
                and all(not isinstance(p, (bool, float)) for p in parts)
            ):
                return (major, minor)
    raise MarkerUsageError(
        f"capability={_short_repr(value)} is not a compute capability: pass (8, 0) or '8.0'"
    )


@functools.cache
def _signature(name: str) -> inspect.Signature:
    return inspect.signature(_SIGNATURES[name])


def validate(mark: pytest.Mark) -> Requirement:
    """Check one marker's arguments; raise MarkerUsageError saying what is wrong."""
    try:
        bound = _signature(mark.name).bind(*mark.args, **mark.kwargs)
    except TypeError as exc:
        raise MarkerUsageError(str(exc)) from None
    bound.apply_defaults()
    args = bound.arguments
    if mark.name == "requires_vram":
        amount = args["amount"]
        free = _bool_arg("free", args["free"])
        total_across = _bool_arg("total_across", args["total_across"])
        if total_across and args["device"] is not None:
            raise MarkerUsageError(
                "device= and total_across=True exclude each other: total_across sums every "
                "visible GPU"
            )
        return VramRequirement(
            amount_bytes=parse_amount(amount),
            amount_text=amount if isinstance(amount, str) else "",
            free=free,
            device=_device_arg(args["device"]),
            total_across=total_across,
        )
    if mark.name == "requires_kernel":
        return KernelRequirement(_kernel_names(args["names"]))
    if mark.name == "requires_fit":
        return _fit_requirement(args["model"], args["device"], dict(args["settings"]))
    if mark.name == "requires_gpu":
        count = args["count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise MarkerUsageError(f"count={_short_repr(count)} is not a positive integer")
        return GpuRequirement(count=count, capability=_capability_arg(args["capability"]))
    return Bf16Requirement()


def _fit_requirement(model: object, device: object, settings: dict[str, Any]) -> FitRequirement:
    """Estimate once; a bad model path or setting is a marker usage error."""
    from pytest_unsloth.fit import estimate_memory
    from pytest_unsloth.fit.plan import find_config

    if not isinstance(model, str) or not model:
        raise MarkerUsageError(f"model={_short_repr(model)} is not a config path or model id")
    try:
        est = estimate_memory(find_config(model), **settings)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MarkerUsageError(f"cannot estimate {model!r}: {exc}") from None
    return FitRequirement(
        model=model,
        device=_device_arg(device),
        total_bytes=est.total_bytes,
        summary=est.summary(),
    )


def _kernel_names(names: Iterable[object]) -> tuple[str, ...]:
    from pytest_unsloth.probes.table import PROBE_NAMES

    names = tuple(names)
    if not names:
        raise MarkerUsageError(f"no kernel named; pass one or more of {', '.join(PROBE_NAMES)}")
    out: list[str] = []
    for raw in names:
        if not isinstance(raw, str):
            raise MarkerUsageError(
                f"{_short_repr(raw)} is not a kernel name; pass strings from "
                f"{', '.join(PROBE_NAMES)}"
            )
        name = raw.strip().lower().replace("_", "-")
        if name == "flash-attention":
            name = "flash-attn"
        if name not in PROBE_NAMES:
            close = difflib.get_close_matches(name, PROBE_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise MarkerUsageError(f"unknown kernel {raw!r}; {hint}known: {', '.join(PROBE_NAMES)}")
        if name not in out:
            out.append(name)
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Evaluation


def visibility_problem(snap: NvmlSnapshot, pin: str | None) -> str | None:
    """Why no GPU is usable here, or None when at least one is visible."""
    if not snap.available:
        hint = " (no NVIDIA driver here)" if snap.error == "NVML Shared Library Not Found" else ""
        return f"NVML is unavailable: {snap.error}{hint}"
    if not snap.devices:
        return "NVML reports no GPU"
    if not snap.visible:
        n = len(snap.devices)
        why = f"CUDA_VISIBLE_DEVICES={snap.cuda_visible_devices!r} hides all {n} GPU(s)"
        return why + (f" ({pin})" if pin else "")
    return None


def torch_cached_bytes(cuda_index: int) -> int:
    """Memory torch's caching allocator in this process holds but does not use on a device.

    NVML counts it as used, yet this process's next allocation gets it back. Read only when
    torch is already imported and CUDA initialised: the plugin never initialises CUDA itself.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    try:
        if not torch.cuda.is_initialized():
            return 0
        reserved = int(torch.cuda.memory_reserved(cuda_index))
        allocated = int(torch.cuda.memory_allocated(cuda_index))
    except Exception:  # an odd torch build must not break a marker
        return 0
    return max(0, reserved - allocated)


def _gib_pair(need: int, have: int) -> tuple[str, str]:
    """Format two amounts with enough decimals that unequal amounts never print equal."""
    for digits in (1, 2, 3):
        a, b = f"{need / GIB:.{digits}f}", f"{have / GIB:.{digits}f}"
        if a != b or need == have:
            return f"{a} GiB", f"{b} GiB"
    return f"{need / MIB:.0f} MiB", f"{have / MIB:.0f} MiB"


def _need_text(req: VramRequirement, need: str) -> str:
    return f"{need} ({req.amount_text.strip()})" if req.amount_text else need


class Evaluation:
    """One item's evaluation: one NVML memory read shared by all its markers."""

    def __init__(self, item: pytest.Item, inventory: GpuInventory, pin: str | None) -> None:
        self.item = item
        self.inventory = inventory
        self.pin = pin
        self.static: NvmlSnapshot | None = None
        self.memory: dict[str, tuple[int, int, int]] = {}

    def read(self, reqs: Sequence[Requirement]) -> NvmlSnapshot:
        """Enumeration (cached for the session) plus memory re-read for the devices asked about."""
        static = self.inventory.static()
        self.static = static
        uuids: set[str] = set()
        for req in reqs:
            if isinstance(req, FitRequirement) and req.device < len(static.visible):
                uuids.add(static.visible[req.device].uuid)
            if isinstance(req, VramRequirement) and req.free:
                if req.total_across:
                    uuids.update(d.uuid for d in static.visible)
                elif req.device < len(static.visible):
                    uuids.add(static.visible[req.device].uuid)
        if uuids and static.available:
            fresh = self.inventory.read_memory(uuids)
            if isinstance(fresh, str):  # the GPU went away since enumeration
                self.static = static = dataclasses.replace(
                    static, available=False, error=fresh, devices=(), visible=()
                )
            else:
                self.memory = fresh
        return static

    def _memory(self, dev: GpuDevice) -> tuple[int, int]:
        """(total, free) bytes of a device: read this evaluation, else as enumerated."""
        fresh = self.memory.get(dev.uuid)
        if fresh is None:
            return dev.total_bytes, dev.free_bytes
        return fresh[0], fresh[1]

    def skip_reason(self, reqs: Sequence[Requirement]) -> str | None:
        """Why the test cannot run here, or None. GPU facts first, kernel probes last."""
        gpu_reqs = [r for r in reqs if not isinstance(r, KernelRequirement)]
        if gpu_reqs:
            snap = self.read(gpu_reqs)
            problem = visibility_problem(snap, self.pin)
            if problem is not None:
                fits = [r for r in gpu_reqs if isinstance(r, FitRequirement)]
                if fits:
                    return f"{_fit_need(fits[0])} on an NVIDIA GPU, but {problem}"
                return f"needs an NVIDIA GPU, but {problem}"
            for req in gpu_reqs:
                reason = self._gpu_reason(req, snap)
                if reason is not None:
                    return reason
        kernel_names = [n for r in reqs if isinstance(r, KernelRequirement) for n in r.names]
        if kernel_names:
            return self._kernel_reason(kernel_names)
        return None

    def _gpu_reason(self, req: Requirement, snap: NvmlSnapshot) -> str | None:
        visible = snap.visible
        if isinstance(req, VramRequirement):
            return self._vram_reason(req, snap)
        if isinstance(req, FitRequirement):
            return self._fit_reason(req, snap)
        if isinstance(req, GpuRequirement):
            good = [d for d in visible if req.capability is None or d.capability >= req.capability]
            if len(good) >= req.count:
                return None
            cap = (
                f" with compute capability >= {req.capability[0]}.{req.capability[1]}"
                if req.capability
                else ""
            )
            listing = ", ".join(f"{d.label}: {d.capability[0]}.{d.capability[1]}" for d in visible)
            plural = "GPU" if req.count == 1 else "GPUs"
            pin = f" ({self.pin})" if self.pin and len(visible) < req.count else ""
            return f"needs {req.count} {plural}{cap}, has {len(good)} ({listing}){pin}"
        if isinstance(req, Bf16Requirement):
            dev = visible[0]
            if dev.bf16:
                return None
            return (
                f"needs bfloat16 (compute capability 8.0 or newer) on {dev.label}, which is "
                f"{dev.capability[0]}.{dev.capability[1]}"
            )
        return None

    def _vram_reason(self, req: VramRequirement, snap: NvmlSnapshot) -> str | None:
        visible = snap.visible
        kind = "free" if req.free else "total"
        if req.total_across:
            amounts = []
            for i, d in enumerate(visible):
                total, free = self._memory(d)
                amounts.append((free + torch_cached_bytes(i)) if req.free else total)
            have = sum(amounts)
            if have >= req.amount_bytes:
                return None
            need_s, have_s = _gib_pair(req.amount_bytes, have)
            per = ", ".join(
                f"{d.label}: {format_gib(a)}" for d, a in zip(visible, amounts, strict=True)
            )
            total_all = format_gib(sum(self._memory(d)[0] for d in visible))
            of = f" of {total_all}" if req.free else ""
            return (
                f"needs {_need_text(req, need_s)} {kind} across {len(visible)} visible GPU(s), "
                f"has {have_s} {kind}{of} ({per})"
            )
        if req.device >= len(visible):
            pin = f" ({self.pin})" if self.pin else ""
            cvd = snap.cuda_visible_devices
            where = f"; CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else ""
            return (
                f"needs {_need_text(req, format_gib(req.amount_bytes))} {kind} on "
                f"cuda:{req.device}, but only {len(visible)} GPU(s) are visible{where}{pin}"
            )
        dev = visible[req.device]
        total, free = self._memory(dev)
        if req.free:
            cached = torch_cached_bytes(req.device)
            have = free + cached
        else:
            cached, have = 0, total
        if have >= req.amount_bytes:
            return None
        need_s, have_s = _gib_pair(req.amount_bytes, have)
        need_s = _need_text(req, need_s)
        if not req.free:
            return f"needs {need_s} total on {dev.label}, has {have_s}"
        extra = f" (incl. {format_gib(cached)} cached by torch in this process)" if cached else ""
        return (
            f"needs {need_s} free on {dev.label}, has {have_s} free of {format_gib(total)}{extra}"
        )

    def _fit_reason(self, req: FitRequirement, snap: NvmlSnapshot) -> str | None:
        visible = snap.visible
        if req.device >= len(visible):
            return (
                f"{_fit_need(req)} on cuda:{req.device}, but only {len(visible)} GPU(s) are visible"
            )
        dev = visible[req.device]
        _total, free = self._memory(dev)
        have = free + torch_cached_bytes(req.device)
        if have >= req.total_bytes:
            return None
        return f"{_fit_need(req)}, has {format_gib(have)} free on {dev.label}"

    def _kernel_reason(self, names: Sequence[str]) -> str | None:
        from pytest_unsloth.probes.runner import get_probe_store

        store = get_probe_store(self.item.config)
        store.start(names)  # all at once: they run concurrently
        for name in names:
            res: ProbeResult = store.get(name)
            if res.status == "passed":
                continue
            verb = "failed" if res.status == "failed" else "did not run"
            need = KERNEL_NEEDS.get(name, f"a working {name}")
            return f"needs {need}; its probe {verb}: {res.message}"
        return None


def _fit_need(req: FitRequirement) -> str:
    return f"needs ~{req.total_bytes / GIB:.1f} GiB (estimate: {req.summary})"


def _requirements(item: pytest.Item) -> list[tuple[pytest.Mark, Requirement]]:
    """Validated requirements of every requires_* marker on the item (closest first)."""
    found: list[tuple[pytest.Mark, Requirement]] = []
    cache = item.config.stash.setdefault(VALIDATED_KEY, {})
    for mark in item.iter_markers():
        if mark.name not in MARKER_NAMES:
            continue
        # Parametrized tests share one Mark object per decorator: validate it once. The cache
        # holds the mark itself, so its id cannot be reused by another object meanwhile.
        hit = cache.get(id(mark))
        if hit is not None and hit[0] is mark:
            result = hit[1]
        else:
            try:
                result = validate(mark)
            except MarkerUsageError as exc:
                result = str(exc)
            cache[id(mark)] = (mark, result)
        if not isinstance(result, str):
            found.append((mark, result))
            continue
        problem = result
        # Outside the except block, so the report shows no chained exception.
        pytest.fail(
            f"{item.nodeid}: bad marker {_call_text(mark)}: {problem}. "
            f"Fix: write it as {_signature_text(mark.name)}; see `pytest --markers`.",
            pytrace=False,
        )
    return found


def gpu_inventory(config: pytest.Config) -> GpuInventory:
    """The session's NVML connection, shared by the markers and the ``gpu`` fixtures."""
    inv = config.stash.get(INVENTORY_KEY, None)
    if inv is None:
        inv = GpuInventory()
        config.stash[INVENTORY_KEY] = inv
    return inv


def _strict(config: pytest.Config) -> bool:
    from pytest_unsloth.settings import get_settings

    return get_settings(config).strict_skips


def skip_or_fail(item: pytest.Item, reason: str) -> None:
    """Skip the test for a missing resource (fail it under --unsloth-strict-skips)."""
    config = item.config
    item.stash[SKIPPED_HERE_KEY] = True
    if _strict(config):
        pytest.fail(f"{reason} [--unsloth-strict-skips: a missing resource fails]", pytrace=False)
    pytest.skip(reason)


def evaluate_item(item: pytest.Item) -> str | None:
    """Validate the item's requires_* markers and return a skip reason, or None to run it."""
    reqs = _requirements(item)
    if not reqs:
        return None
    config = item.config
    ev = Evaluation(item, gpu_inventory(config), config.stash.get(PIN_KEY, None))
    return ev.skip_reason([r for _, r in reqs])


# ----------------------------------------------------------------------------------------------
# Hooks


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers' help lines (``pytest --markers`` shows them)."""
    for line in MARKER_HELP.values():
        config.addinivalue_line("markers", line)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Shut NVML down if the markers or fixtures opened it."""
    inv = config.stash.get(INVENTORY_KEY, None)
    if inv is not None:
        inv.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Evaluate the requires_* markers before any fixture is set up."""
    reason = evaluate_item(item)
    if reason is not None:
        skip_or_fail(item, reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Point a marker's skip at the test (as pytest's skipif does), not at this module."""
    rep = yield
    if (
        rep.skipped
        and item.stash.get(SKIPPED_HERE_KEY, False)
        and isinstance(rep.longrepr, tuple)
        and len(rep.longrepr) == 3
    ):
        path, line = item.reportinfo()[:2]
        rep.longrepr = (str(path), (line or 0) + 1, rep.longrepr[2])
    return rep
