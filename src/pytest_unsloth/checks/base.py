"""What a check is, how it fails or skips, and the context it reads the environment from."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_unsloth.findings import Finding

if TYPE_CHECKING:
    import pytest

    from pytest_unsloth.checks.per_gpu import GpuGroup
    from pytest_unsloth.compat.distributions import Dist, Distributions
    from pytest_unsloth.gpu import NvmlSnapshot
    from pytest_unsloth.probes.protocol import ProbeResult
    from pytest_unsloth.probes.runner import Pin, ProbeStore
    from pytest_unsloth.settings import Settings

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class CheckFailed(Exception):
    """Raise from a check to fail it with three short lines: what was found, why it matters, fix."""

    def __init__(self, found: str, why: str = "", fix: str = "") -> None:
        super().__init__(found)
        self.finding = Finding(found, why, fix)

    @property
    def found(self) -> str:
        """What the check found."""
        return self.finding.found

    @property
    def why(self) -> str:
        """Why it matters (may be empty)."""
        return self.finding.why

    @property
    def fix(self) -> str:
        """How to fix it (may be empty)."""
        return self.finding.fix

    def render(self) -> str:
        """The three lines shown under the failing item (no traceback)."""
        return self.finding.render()


class CheckSkipped(Exception):
    """Raise from a check to skip it with a precise reason (not applicable here)."""


CheckFunc = Callable[["CheckContext"], "str | None"]


@dataclasses.dataclass(frozen=True)
class Check:
    """One environment check: an ``unsloth-env::NAME`` item when ``--unsloth-env`` is given.

    ``func(ctx)`` returns normally (optionally a one-line detail) to pass, raises
    ``CheckFailed`` to fail and ``CheckSkipped`` (or calls ``pytest.skip``) to skip.
    ``probes`` names kernel probes the check reads, so they start early and run concurrently.
    ``isolated`` runs the function in a subprocess with ``timeout`` seconds (a hang or a crash
    then fails only this check); ``cacheable`` lets a passing isolated result be reused between
    runs under the probe cache's fingerprint. ``depends_on`` names root causes (see
    ``CheckContext.root_cause``) whose owner check reports them: while one holds, this check
    skips with "see unsloth-env::OWNER" instead of failing with the same message again.
    ``builtin`` marks the plugin's own checks (``checks.registry.builtin_check``): they run
    with the Hub offline unless allowed, and diagnose a missing GPU themselves.
    """

    name: str
    func: CheckFunc
    description: str = ""
    needs_gpu: bool = False
    isolated: bool = False
    timeout: float | None = None
    cacheable: bool = False
    probes: tuple[str, ...] = ()
    source: str = "pytest-unsloth"
    disabled: str | None = None
    depends_on: tuple[str, ...] = ()
    builtin: bool = False

    def __post_init__(self) -> None:
        problem = _check_problem(self)
        if problem:
            raise ValueError(problem)
        probes: object = self.probes  # typed as a tuple; users write lists
        if isinstance(probes, list):
            object.__setattr__(self, "probes", tuple(probes))
        from pytest_unsloth.checks.registry import _adapt

        # A function taking no argument is called without the context, as with @check.
        object.__setattr__(self, "func", _adapt(self.func))


# A week: longer timeouts overflow the subprocess/select time conversions.
_MAX_TIMEOUT = 7 * 24 * 3600.0


def _check_problem(chk: Check) -> str | None:
    """Why ``Check(...)`` was given wrong arguments (each named with its value), or None."""
    # Read as plain objects: the annotations say what callers should pass, not what they did.
    fields: dict[str, object] = {f.name: getattr(chk, f.name) for f in dataclasses.fields(chk)}
    source, name = fields["source"], fields["name"]
    if not isinstance(source, str):
        return f"Check(source={source!r}): source must be a string"
    where = f"(from {source})"
    if not isinstance(name, str):
        return (
            f"check name {name!r} {where} is {type(name).__name__}, not a string; "
            "name checks like 'team-disk' (lower-case letters, digits, '-', '_' or '.')"
        )
    if not NAME_RE.match(name):
        return (
            f"check name {name!r} {where} must be lower-case letters, "
            "digits, '-', '_' or '.', starting with a letter or digit"
        )
    label = f"check {name!r} {where}"
    problem = function_problem(fields["func"])
    if problem:
        return f"{label}: {problem}"
    if not isinstance(fields["description"], str):
        return f"{label}: description={fields['description']!r} must be a string"
    for flag in ("needs_gpu", "isolated", "cacheable", "builtin"):
        if not isinstance(fields[flag], bool):
            return f"{label}: {flag}={fields[flag]!r} must be True or False"
    t = fields["timeout"]
    if t is not None and (
        isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= _MAX_TIMEOUT
    ):
        return f"{label}: timeout={t!r} must be a number of seconds in (0, {_MAX_TIMEOUT:.0f}]"
    probes = fields["probes"]
    if isinstance(probes, str) or not isinstance(probes, (tuple, list)):
        return f"{label}: probes={probes!r} must be a tuple of probe names"
    if not all(isinstance(p, str) for p in probes):
        return f"{label}: probes={probes!r} must hold probe names (strings)"
    disabled = fields["disabled"]
    if disabled is not None and not isinstance(disabled, str):
        return f"{label}: disabled={disabled!r} must be None or a reason (a string)"
    return None


def function_problem(func: object) -> str | None:
    """Why ``func`` cannot be a check function (called with the context), or None."""
    import inspect

    if isinstance(func, type):
        return f"{func.__name__} is a class; decorate a function that takes no argument or one"
    if not callable(func):
        return f"{func!r} is not callable; a check is a function"
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None  # builtins without a signature: let the call decide
    try:
        sig.bind(None)
    except TypeError:
        try:
            sig.bind()
        except TypeError:
            return (
                f"{getattr(func, '__qualname__', func)!r} takes {sig}; a check function takes "
                "no argument or one (the CheckContext)"
            )
    return None


def bad_return(detail: object) -> str | None:
    """Why a check's return value is not a pass (None or a one-line string), or None."""
    if detail is None or isinstance(detail, str):
        return None
    return (
        f"returned {type(detail).__name__} {detail!r:.80}; a check returns None or a string to "
        "pass, raises pytest_unsloth.CheckFailed(found, why, fix) to fail and calls "
        "pytest.skip(reason) to skip"
    )


class CheckError(Exception):
    """A check raised something other than the documented failure (a bug in the check)."""


class CheckContext:
    """Session-wide, read-only view of the environment shared by every check.

    Everything is computed lazily and at most once per session, so a check that is
    deselected costs nothing.
    """

    def __init__(
        self, settings: Settings, rootpath: Path, config: pytest.Config | None = None
    ) -> None:
        self.config = config  # None inside an isolated check's subprocess
        self.settings = settings
        self.rootpath = rootpath
        self._lock = threading.Lock()
        self._inventory: Distributions | None = None
        self._nvml: NvmlSnapshot | None = None
        # On an xdist worker whose GPUs the plugin pinned: the environment the user gave pytest.
        self.machine_env: dict[str, str] | None = None
        if config is not None:
            from pytest_unsloth.pinning import machine_environ

            self.machine_env = machine_environ(config)
        # Probe results folded over every kind of GPU (machine view only), by probe name.
        self.combined: dict[str, ProbeResult] = {}
        self._causes: dict[str, tuple[str, str | None]] = {}
        self._causes_lock = threading.Lock()

    @property
    def inventory(self) -> Distributions:
        """Installed distributions of the stack (metadata only, nothing imported)."""
        with self._lock:
            if self._inventory is None:
                from pytest_unsloth.compat.distributions import Distributions

                self._inventory = Distributions.read(extra=self.settings.require)
            return self._inventory

    def dist(self, name: str) -> Dist | None:
        """The installed distribution that imports win for, or None."""
        return self.inventory.get(name)

    @property
    def nvml(self) -> NvmlSnapshot:
        """NVML's view of the GPUs, read once for the checks (markers read fresh)."""
        with self._lock:
            if self._nvml is None:
                from pytest_unsloth.gpu import read_snapshot

                self._nvml = read_snapshot(with_processes=True, environ=self.machine_env)
            return self._nvml

    @property
    def probes(self) -> ProbeStore:
        """The session's probe store (subprocess probes, run once, shared with markers)."""
        from pytest_unsloth.probes.runner import ProbeStore, get_probe_store

        if self.config is None:  # inside an isolated check: probe directly, no sharing
            return ProbeStore(self.settings)
        return get_probe_store(self.config)

    def _pins(self, name: str) -> list[tuple[Pin, GpuGroup | None]] | None:
        """Where probe NAME runs for the checks: None for this process's own view."""
        if self.machine_env is None:
            return None
        from pytest_unsloth.checks.per_gpu import gpu_groups
        from pytest_unsloth.probes.runner import Pin

        # torch counts the GPUs and nccl joins them all: both need the whole machine at once.
        groups = gpu_groups(self.nvml) if name not in ("torch", "nccl") else []
        if not groups:
            return [(Pin(self.machine_env.get("CUDA_VISIBLE_DEVICES")), None)]
        return [(g.pin, g) for g in groups]

    def start_probes(self, names: Iterable[str]) -> None:
        """Start the named probes where the checks will read them, all at once."""
        for name in names:
            pins = self._pins(name)
            for pin in [None] if pins is None else [p for p, _ in pins]:
                self.probes.start([name], pin)

    def probe(self, name: str) -> ProbeResult:
        """Wait for a kernel probe's result (it may already be running concurrently).

        On a worker the plugin pinned, the probe runs on the machine's GPUs instead: torch's
        with every GPU the user made visible, a kernel's once per kind of GPU (see per_gpu).
        """
        pins = self._pins(name)
        if pins is None:
            return self.probes.get(name)
        groups = [g for _, g in pins if g is not None]
        if not groups:
            return self.probes.get(name, pins[0][0])
        from pytest_unsloth.checks.per_gpu import probe_every_kind

        result = probe_every_kind(self.probes, name, groups)
        self.combined[name] = result
        return result

    def root_cause(self, name: str) -> tuple[str, str | None]:
        """(owner check, what it finds) for a named root cause; the text is None when it holds.

        Derived from the environment (NVML, the shared torch probe), not from the owner item's
        outcome, so every xdist worker reaches the same verdict without talking to the others.
        """
        with self._causes_lock:
            known = self._causes.get(name)
            if known is not None:
                return known
            from pytest_unsloth.checks.cuda import ROOT_CAUSES

            if name not in ROOT_CAUSES:
                raise KeyError(f"unknown root cause {name!r}; known: {', '.join(ROOT_CAUSES)}")
            owner, func = ROOT_CAUSES[name]
            verdict = (owner, func(self))
            self._causes[name] = verdict
            return verdict
