"""Shared test configuration: offline Hub, GPU-only tests gated by UNSLOTH_TEST_GPU=1."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ON_GPU_MACHINE = os.environ.get("UNSLOTH_TEST_GPU") == "1"


def _import_plugin_modules() -> None:
    """Import every plugin module now, before pytester snapshots sys.modules.

    In-process pytester runs drop modules first imported during the run; a module re-imported
    in a later run would then define a second CheckFailed class, unlike in real use.
    """
    import importlib
    import pkgutil

    import pytest_unsloth

    # hypothesis' own pytest plugin imports it in every run's summary; import it once here.
    with __import__("contextlib").suppress(ImportError):
        import hypothesis  # noqa: F401

    for info in pkgutil.walk_packages(pytest_unsloth.__path__, "pytest_unsloth."):
        if info.name.endswith(("triton_kernel", "__main__")):
            continue  # imports triton / runs a probe
        importlib.import_module(info.name)


_import_plugin_modules()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` unless UNSLOTH_TEST_GPU=1 (set on the lent GPU machine)."""
    if ON_GPU_MACHINE:
        return
    skip = pytest.mark.skip(reason="needs the GPU machine (set UNSLOTH_TEST_GPU=1 there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# Fake NVML (tests/fakes/nvml/pynvml.py), for the GPU-present branches on machines without a GPU.

FAKE_NVML_DIR = Path(__file__).parent / "fakes" / "nvml"
FAKE_NVML_ENV = "PYTEST_UNSLOTH_FAKE_NVML"


class FakeNvml:
    """Handle on the fake NVML's spec; every change writes a new file that later calls read."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder = folder
        self.spec: dict[str, Any] = {}
        self._monkeypatch = monkeypatch
        self._generation = 0
        self.path = folder / "nvml-0.json"

    def set(self, **spec: Any) -> FakeNvml:
        """Replace the whole spec (keys: gpus, driver, cuda_driver, no_driver, init_error)."""
        self.spec = json.loads(json.dumps(spec))
        return self._write()

    def update(self, **changes: Any) -> FakeNvml:
        """Change top-level keys of the spec (e.g. ``no_driver=True``)."""
        self.spec.update(json.loads(json.dumps(changes)))
        return self._write()

    def update_gpu(self, index: int, **changes: Any) -> FakeNvml:
        """Change one GPU's entry (e.g. ``free_gib=3.0``); drops free_bytes when free_gib is set."""
        gpu = self.spec["gpus"][index]
        for key in changes:
            for unit in ("_gib", "_bytes"):
                if key.endswith(unit):
                    gpu.pop(key[: -len(unit)] + ("_bytes" if unit == "_gib" else "_gib"), None)
        gpu.update(json.loads(json.dumps(changes)))
        return self._write()

    @property
    def calls(self) -> dict[str, int]:
        """Call counters of the fake module loaded in this process ({} when not imported)."""
        module = sys.modules.get("pynvml")
        counters: dict[str, int] = getattr(module, "CALLS", {})
        return counters

    def _write(self) -> FakeNvml:
        # A new file name per change, so the fake's (path, mtime, size) cache can never keep a
        # stale spec, and child processes started later get the current one through the env.
        self._generation += 1
        self.path = self.folder / f"nvml-{self._generation}.json"
        self.path.write_text(json.dumps(self.spec, indent=1), encoding="utf-8")
        self._monkeypatch.setenv(FAKE_NVML_ENV, str(self.path))
        return self


@pytest.fixture
def fake_nvml(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., FakeNvml]]:
    """Factory: ``fake_nvml(gpus=[{...}], driver="580.159.04", cuda_driver=13000)`` -> FakeNvml.

    Puts the fake ``pynvml`` first on sys.path and PYTHONPATH (so pytester subprocesses and probe
    children import it too), points PYTEST_UNSLOTH_FAKE_NVML at the spec and drops any imported
    ``pynvml``; the real module is back in sys.modules after the test.
    """
    original = sys.modules.pop("pynvml", None)
    monkeypatch.syspath_prepend(str(FAKE_NVML_DIR))
    old_pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv(
        "PYTHONPATH",
        str(FAKE_NVML_DIR) + (os.pathsep + old_pythonpath if old_pythonpath else ""),
    )
    folder = tmp_path_factory.mktemp("fake-nvml")

    def make(**spec: Any) -> FakeNvml:
        handle = FakeNvml(folder, monkeypatch).set(**spec)
        # Imported now, so pytester's inline runs (which restore sys.modules afterwards) share
        # this module object and its call counters with the test.
        module = importlib.import_module("pynvml")
        assert Path(module.__file__ or "").parent == FAKE_NVML_DIR, module
        return handle

    yield make
    sys.modules.pop("pynvml", None)
    if original is not None:
        sys.modules["pynvml"] = original


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on sys.path where tests write fake installs (a test file may override)."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder
