"""``python -m pytest_unsloth.archs``: which GPU architectures compiled extensions carry code for.

The documented command; the fatbin reader itself is ``pytest_unsloth.compat.archs``.
"""

from __future__ import annotations

from pytest_unsloth.compat.archs import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
