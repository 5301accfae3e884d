"""pytest-unsloth: check an Unsloth / TRL fine-tuning environment before it burns GPU hours."""

from __future__ import annotations

__version__ = "0.1.0"
