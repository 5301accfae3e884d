"""Stand-in for your real base model: writes pytest-unsloth's tiny offline model to models/base.

A real project points `unsloth_tokenizer` (and `unsloth_model`) at its own model folder instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pytest_unsloth.models import tiny

if __name__ == "__main__":
    target = Path(__file__).parent / "models" / "base"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tiny.build("qwen2", seed=0), target)
    print(f"tiny qwen2 model written to {target}")
