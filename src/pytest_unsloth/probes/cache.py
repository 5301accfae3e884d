"""Probe results remembered between runs in pytest's cache, keyed by what could change them.

Only passing results are reused, only under an identical fingerprint and only for a bounded age:
a failure is always probed again (so a fix is seen at once), and a GPU that broke since is caught
by the age limit or ``--unsloth-reprobe``. Free memory is never part of a probe result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_unsloth.probes.protocol import ProbeResult
from pytest_unsloth.util.files import file_lock, write_json_atomic

if TYPE_CHECKING:
    from pytest_unsloth.gpu import NvmlSnapshot
    from pytest_unsloth.settings import Settings

# Variables that change what a probe child finds or does.
ENV_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "CUDA_HOME",
    "CUDA_PATH",
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "PATH",
    "PYTHONPATH",
    "PYTORCH_CUDA_ALLOC_CONF",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "BNB_CUDA_VERSION",
    "TRITON_CACHE_DIR",
    "TRITON_PTXAS_PATH",
    "XFORMERS_DISABLED",
    "VLLM_USE_V1",
    "UNSLOTH_COMPILE_DISABLE",
    # NCCL's transport choices change what the nccl probe finds.
    "NCCL_P2P_DISABLE",
    "NCCL_IB_DISABLE",
    "NCCL_SHM_DISABLE",
    "NCCL_SOCKET_IFNAME",
    "NCCL_NET",
    "NCCL_P2P_LEVEL",
)


def _record_stamp(dist_info: str) -> list[object]:
    """(size, mtime) of a distribution's RECORD: a reinstall rewrites it."""
    try:
        st = (Path(dist_info) / "RECORD").stat()
    except OSError:
        return [None, None]
    return [st.st_size, st.st_mtime_ns]


def fingerprint_inputs(
    nvml: NvmlSnapshot, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Everything a probe result depends on (what the fingerprint hashes)."""
    from pytest_unsloth import __version__
    from pytest_unsloth.compat.distributions import Distributions
    from pytest_unsloth.util.scratch import set_by_us

    env = os.environ if environ is None else environ
    packages = {
        d.key: [d.version, d.location, *_record_stamp(d.path)]
        for d in Distributions.read().installed()
    }
    return {
        "plugin": __version__,
        "python": [sys.executable, platform.python_version()],
        "packages": packages,
        "driver": nvml.driver_version,
        "cuda_driver": nvml.cuda_driver_version,
        "gpus": [[g.uuid, g.name] for g in nvml.devices],
        "env": {k: None if set_by_us(k, env.get(k)) else env.get(k) for k in ENV_VARS},
    }


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A short stable hash of the inputs."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# Bumped whenever the layout of an entry changes: an entry of another schema is dropped.
SCHEMA = 2
ENTRY_DIR = "unsloth-probes"
LOCK_DIR = "unsloth-locks"


class CacheUnusable(Exception):
    """The cache folder cannot be created, read, written or locked."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def entry_problem(entry: object) -> str | None:
    """Why a stored entry cannot be trusted (None when it can)."""
    if not isinstance(entry, dict):
        return f"not a JSON object but {type(entry).__name__}"
    if entry.get("schema") != SCHEMA:
        return f"schema {entry.get('schema')!r}, expected {SCHEMA}"
    result = entry.get("result")
    checks = {
        "fingerprint": isinstance(entry.get("fingerprint"), str),
        "time": _is_number(entry.get("time")),
        "result": isinstance(result, dict),
    }
    if isinstance(result, dict):
        checks.update(
            {
                "result.status": result.get("status") in ("passed", "failed", "skipped"),
                "result.message": isinstance(result.get("message"), str),
                "result.stage": result.get("stage") is None or isinstance(result["stage"], str),
                "result.data": isinstance(result.get("data", {}), dict),
                "result.duration": _is_number(result.get("duration", 0.0)),
            }
        )
    bad = [key for key, ok in checks.items() if not ok]
    return f"wrong type or value of {', '.join(bad)}" if bad else None


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".json"


class ProbeCache:
    """Passing probe results in pytest's cache folder (``d/unsloth-probes/KEY.json``).

    Entries are named by key: a probe's ``Job.key`` (its name, or ``NAME@GPUS`` when pinned) or
    an isolated check's ``check-NAME-STAMP``.

    The cache only ever saves time: when it cannot be used (folder not creatable, not writable,
    a lock that cannot be opened) probes run uncached and one warning says so; a damaged entry
    is dropped and written again.
    """

    def __init__(
        self, cache: pytest.Cache, settings: Settings, nvml: Callable[[], NvmlSnapshot]
    ) -> None:
        self.cache = cache
        self.max_age = settings.probe_cache_max_age_hours * 3600
        self.reprobe = settings.reprobe
        self._nvml = nvml
        self._fingerprint: str | None = None
        self.unusable: str | None = None  # why the cache is off for the rest of the session
        self._guard = threading.Lock()
        self._pending: list[str] = []
        self._warned: set[str] = set()

    @property
    def fingerprint(self) -> str:
        """This environment's fingerprint (computed once per session)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(fingerprint_inputs(self._nvml()))
        return self._fingerprint

    def _note(self, message: str) -> None:
        with self._guard:
            if message not in self._warned:
                self._warned.add(message)
                self._pending.append(message)

    def _give_up(self, what: str, exc: BaseException) -> None:
        with self._guard:
            first = self.unusable is None
            if first:
                self.unusable = f"{what}: {exc}"
        if first:
            self._note(
                f"pytest-unsloth: the probe cache cannot be used ({what}: {exc}); probes run "
                "uncached this session. Fix: make the cache_dir writable, or run with "
                "-p no:cacheprovider"
            )

    def warn_pending(self) -> None:
        """Issue the cache's pending warnings (call from the main thread, inside a test)."""
        with self._guard:
            pending, self._pending = self._pending, []
        for message in pending:
            warnings.warn(pytest.PytestCacheWarning(message), stacklevel=2)

    def _dir(self, name: str) -> Path:
        try:
            return self.cache.mkdir(name)
        except OSError as exc:
            raise CacheUnusable(f"cannot create the cache folder {name!r}: {exc}") from exc

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Serialise probing KEY across processes sharing this cache (terminals, workers);
        a lock that cannot be taken turns the cache off instead of failing the probe."""
        with contextlib.ExitStack() as stack:
            if self.unusable is None:
                try:
                    folder = self._dir(LOCK_DIR)
                    stack.enter_context(file_lock(folder / (_file_name(key)[:-5] + ".lock")))
                except (OSError, CacheUnusable) as exc:
                    self._give_up("cannot take the probe lock", exc)
            yield

    def _entry_path(self, key: str) -> Path:
        return self._dir(ENTRY_DIR) / _file_name(key)

    def lookup(self, key: str) -> ProbeResult | None:
        """A fresh passing result stored under KEY for this fingerprint, else None."""
        if self.reprobe or self.max_age <= 0 or self.unusable is not None:
            return None
        try:
            path = self._entry_path(key)
            if not path.exists():
                return None
            try:
                text = path.read_text(encoding="utf-8")
                entry: Any = json.loads(text)
            except (ValueError, UnicodeDecodeError) as exc:
                problem: str | None = f"not valid JSON ({exc})"
            else:
                problem = entry_problem(entry)
            if problem is not None:
                path.unlink()
                self._note(
                    f"pytest-unsloth: dropped a damaged probe-cache entry for {key!r} "
                    f"({problem}); probed again and rewritten"
                )
                return None
        except (OSError, CacheUnusable) as exc:
            self._give_up("cannot read the probe cache", exc)
            return None
        try:
            current = self.fingerprint
        except Exception as exc:  # a broken install is the checks' finding, not the cache's
            self._give_up("cannot fingerprint the environment", exc)
            return None
        if entry["fingerprint"] != current:
            return None
        age = time.time() - float(entry["time"])
        result = entry["result"]
        if result["status"] != "passed" or not 0 <= age <= self.max_age:
            return None
        return dataclasses.replace(ProbeResult.from_json(result), origin="cache", age_s=age)

    def store(self, result: ProbeResult, key: str | None = None) -> None:
        """Remember a passing result under ``key`` (default: its name); forget a failure."""
        if self.unusable is not None or result.status == "skipped":
            return
        try:
            path = self._entry_path(result.name if key is None else key)
            if result.status == "passed":
                entry = {
                    "schema": SCHEMA,
                    "fingerprint": self.fingerprint,
                    "time": time.time(),
                    "result": result.to_json(),
                }
                write_json_atomic(path, entry)
            else:
                path.unlink(missing_ok=True)
        except Exception as exc:  # the cache only saves time: never fail a probe for it
            self._give_up("cannot write the probe cache", exc)


def make_cache(
    config: pytest.Config, settings: Settings, nvml: Callable[[], NvmlSnapshot]
) -> ProbeCache | None:
    """The cache for this session, or None with ``-p no:cacheprovider``."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return None
    return ProbeCache(cache, settings, nvml)
