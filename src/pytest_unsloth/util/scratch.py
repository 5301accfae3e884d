"""Nothing left behind: where our own calls' side files go, and removing per-run folders.

Importing peft or trl imports ``torch._dynamo``, which creates ``$TMPDIR/torchinductor_<user>``
(and later triton's cache) on import. ``torch_caches(config)`` points those caches into pytest's
cache folder (``.pytest_cache/d/unsloth-torch-caches``, or a session folder removed at the end)
for the duration of *our* calls only; variables the user set are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

# Cache locations torch and triton compute from these variables (else from the temp dir/home).
CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
_ROOT_KEY = pytest.StashKey[Path]()
_lock = threading.RLock()
T = TypeVar("T")


def _session_dir(config: pytest.Config, prefix: str) -> Path:
    """A folder for this session, removed when pytest finishes."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def cache_root(config: pytest.Config) -> Path:
    """Where our calls' torch/triton caches go: pytest's cache folder when usable."""
    root = config.stash.get(_ROOT_KEY, None)
    if root is None:
        cache = getattr(config, "cache", None)
        try:
            if cache is None:
                raise OSError("no cacheprovider")
            root = cache.mkdir("unsloth-torch-caches")
        except OSError:
            root = _session_dir(config, "pytest-unsloth-torch-")
        config.stash[_ROOT_KEY] = root
    return root


# The values torch_caches set right now: the probe-cache fingerprint must not see them (a probe
# thread reading os.environ during a check would otherwise get another fingerprint).
OURS: dict[str, str] = {}


def set_by_us(var: str, value: str | None) -> bool:
    """Whether ``var=value`` in os.environ is torch_caches' own temporary setting."""
    return value is not None and OURS.get(var) == value


@contextlib.contextmanager
def torch_caches(config: pytest.Config | None) -> Iterator[None]:
    """During the block, torch/triton caches the user did not place go under ``cache_root``."""
    if config is None:
        yield
        return
    with _lock:
        unset = [var for var in CACHE_VARS if var not in os.environ]
        if not unset:
            yield
            return
        root = cache_root(config)
        for var in unset:
            os.environ[var] = OURS[var] = str(root / var.split("_")[0].lower())
        try:
            yield
        finally:
            # torch writes the variable itself on first use: take ours back either way.
            for var in unset:
                os.environ.pop(var, None)
                OURS.pop(var, None)


_RUN_UIDS = pytest.StashKey[set[str]]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: remember the run id its workers share probe results under."""
    uid = getattr(node, "workerinput", {}).get("testrunuid")
    if uid:
        node.config.stash.setdefault(_RUN_UIDS, set()).add(str(uid))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the per-run folders of this session (on the xdist controller, after the workers)."""
    uids = config.stash.get(_RUN_UIDS, set())
    if not uids:
        return
    from pytest_unsloth.probes.runner import run_dir_path

    for uid in uids:
        shutil.rmtree(run_dir_path(uid), ignore_errors=True)


def with_torch_caches(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate a method of an object holding the fixture ``_request``: run it in
    ``torch_caches(request.config)``."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        request = getattr(self, "_request", None)
        with torch_caches(getattr(request, "config", None)):
            return method(self, *args, **kwargs)

    return wrapper
