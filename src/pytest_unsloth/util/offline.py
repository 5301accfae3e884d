"""Keep the Hub calls our own code makes in the pytest process offline.

Probe children get ``HF_HUB_OFFLINE=1`` in their environment. In the pytest process that is not
enough: huggingface_hub reads the variable once, at import, into ``constants.HF_HUB_OFFLINE``,
and with it unset transformers 5 still resolves huggingface.co even under
``local_files_only=True``. ``hub_offline()`` therefore sets the variables *and* the constants
the libraries consult at call time, for the duration of our call only, and puts back the
user's values afterwards (their own code keeps their settings).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Iterator

# The variables probe children get too (see probe.CHILD_ENV).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# (module, attribute) pairs holding an import-time copy of the offline switch.
_CONSTANTS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)
_lock = threading.RLock()


def _import_constants() -> None:
    """Import huggingface_hub's constants before we touch the environment, so their
    import-time values stay the user's (the module is small: stdlib only)."""
    with contextlib.suppress(Exception):
        importlib.import_module("huggingface_hub.constants")


@contextlib.contextmanager
def hub_offline(allow_download: bool = False) -> Iterator[None]:
    """Inside the block, Hub calls fail at once instead of reaching the network (unless
    ``allow_download``: then nothing changes)."""
    if allow_download:
        yield
        return
    with _lock:
        _import_constants()
        saved_env = {key: os.environ.get(key) for key in OFFLINE_ENV}
        saved: dict[tuple[str, str], object] = {}
        for module_name, attr in _CONSTANTS:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attr):
                saved[(module_name, attr)] = getattr(module, attr)
                setattr(module, attr, True)
        os.environ.update(OFFLINE_ENV)
        try:
            yield
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            for module_name, attr in _CONSTANTS:
                module = sys.modules.get(module_name)
                if module is None or not hasattr(module, attr):
                    continue
                if (module_name, attr) in saved:
                    setattr(module, attr, saved[(module_name, attr)])
                else:
                    # First imported inside the block, so it read our "1": give it the user's.
                    setattr(module, attr, _user_value(module_name, saved_env))


def _user_value(module_name: str, env: dict[str, str | None]) -> bool:
    """The value the module would have read from the user's environment."""

    def true(key: str) -> bool:
        return (env.get(key) or "").upper() in {"1", "ON", "YES", "TRUE"}

    hub = true("HF_HUB_OFFLINE") or true("TRANSFORMERS_OFFLINE")
    if module_name == "datasets.config" and env.get("HF_DATASETS_OFFLINE") is not None:
        return true("HF_DATASETS_OFFLINE")
    return hub
