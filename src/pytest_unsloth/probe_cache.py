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
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

    from pytest_unsloth.gpu import NvmlSnapshot
    from pytest_unsloth.probe import ProbeResult
    from pytest_unsloth.settings import Settings

CACHE_PREFIX = "unsloth/probes/"
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
    from pytest_unsloth.meta import Inventory

    env = os.environ if environ is None else environ
    packages = {
        d.key: [d.version, d.location, *_record_stamp(d.path)] for d in Inventory.read().installed()
    }
    return {
        "plugin": __version__,
        "python": [sys.executable, platform.python_version()],
        "packages": packages,
        "driver": nvml.driver_version,
        "cuda_driver": nvml.cuda_driver_version,
        "gpus": [[g.uuid, g.name] for g in nvml.devices],
        "env": {k: env.get(k) for k in ENV_VARS},
    }


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A short stable hash of the inputs."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class ProbeCache:
    """Passing probe results in ``config.cache`` under ``unsloth/probes/NAME``."""

    def __init__(
        self, cache: pytest.Cache, settings: Settings, nvml: Callable[[], NvmlSnapshot]
    ) -> None:
        self.cache = cache
        self.max_age = settings.probe_cache_max_age_hours * 3600
        self.reprobe = settings.reprobe
        self._nvml = nvml
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """This environment's fingerprint (computed once per session)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(fingerprint_inputs(self._nvml()))
        return self._fingerprint

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialise probing NAME across processes sharing this cache (terminals, workers)."""
        from pytest_unsloth.probe import file_lock

        with file_lock(self.cache.mkdir("unsloth-locks") / f"{name}.lock"):
            yield

    def lookup(self, name: str) -> ProbeResult | None:
        """A fresh passing result for this fingerprint, else None."""
        from pytest_unsloth.probe import ProbeResult

        if self.reprobe or self.max_age <= 0:
            return None
        entry = self.cache.get(CACHE_PREFIX + name, None)
        if not isinstance(entry, dict) or entry.get("fingerprint") != self.fingerprint:
            return None
        age = time.time() - float(entry.get("time", 0))
        result = entry.get("result") or {}
        if result.get("status") != "passed" or not 0 <= age <= self.max_age:
            return None
        return dataclasses.replace(ProbeResult.from_json(result), origin="cache", age_s=age)

    def store(self, result: ProbeResult, key: str | None = None) -> None:
        """Remember a passing result (under ``key``, default its name); forget a failure."""
        key = result.name if key is None else key
        if result.status == "passed":
            self.cache.set(
                CACHE_PREFIX + key,
                {
                    "fingerprint": self.fingerprint,
                    "time": time.time(),
                    "result": result.to_json(),
                },
            )
        elif result.status == "failed":
            self.cache.set(CACHE_PREFIX + key, None)


def make_cache(
    config: pytest.Config, settings: Settings, nvml: Callable[[], NvmlSnapshot]
) -> ProbeCache | None:
    """The cache for this session, or None with ``-p no:cacheprovider``."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return None
    return ProbeCache(cache, settings, nvml)
