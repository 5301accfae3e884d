"""Real models for tests: load in 4-bit and verify (``loader``), add LoRA adapters (``lora``),
build an offline tiny model (``tiny``).

The submodules import torch, transformers and peft inside their functions only.
"""

from __future__ import annotations

# Users filter it as ``-W error::pytest_unsloth.models.UnslothImportOrderWarning``; the loader
# imports only the standard library and pytest at import time.
from pytest_unsloth.models.loader import UnslothImportOrderWarning

__all__ = ["UnslothImportOrderWarning"]
