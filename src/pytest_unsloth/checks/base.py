"""What a check is, how it fails or skips, and the context it reads the environment from."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

    from pytest_unsloth.gpu import NvmlSnapshot
    from pytest_unsloth.meta import Dist, Inventory
    from pytest_unsloth.probe import ProbeResult, ProbeStore
    from pytest_unsloth.settings import Settings

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class CheckFailed(Exception):
    """Raise from a check to fail it with three short lines: what was found, why it matters, fix."""

    def __init__(self, found: str, why: str = "", fix: str = "") -> None:
        super().__init__(found)
        self.found = found
        self.why = why
        self.fix = fix

    def render(self) -> str:
        """The three lines shown under the failing item (no traceback)."""
        lines = [f"found: {self.found}"]
        if self.why:
            lines.append(f"why:   {self.why}")
        if self.fix:
            lines.append(f"fix:   {self.fix}")
        return "\n".join(lines)


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

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(
                f"check name {self.name!r} (from {self.source}) must be lower-case letters, "
                "digits, '-', '_' or '.', starting with a letter or digit"
            )


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
        self._inventory: Inventory | None = None
        self._nvml: NvmlSnapshot | None = None
        self._causes: dict[str, tuple[str, str | None]] = {}
        self._causes_lock = threading.Lock()

    @property
    def inventory(self) -> Inventory:
        """Installed distributions of the stack (metadata only, nothing imported)."""
        with self._lock:
            if self._inventory is None:
                from pytest_unsloth.meta import Inventory

                self._inventory = Inventory.read(extra=self.settings.require)
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

                self._nvml = read_snapshot(with_processes=True)
            return self._nvml

    @property
    def probes(self) -> ProbeStore:
        """The session's probe store (subprocess probes, run once, shared with markers)."""
        from pytest_unsloth.probe import ProbeStore, get_probe_store

        if self.config is None:  # inside an isolated check: probe directly, no sharing
            return ProbeStore(self.settings)
        return get_probe_store(self.config)

    def probe(self, name: str) -> ProbeResult:
        """Wait for a kernel probe's result (it may already be running concurrently)."""
        return self.probes.get(name)

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
