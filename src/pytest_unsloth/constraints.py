"""``python -m pytest_unsloth.constraints``: a pip constraints file for the stack as it works now.

The documented command; the report and the file writer are ``pytest_unsloth.compat.constraints``.
"""

from __future__ import annotations

from pytest_unsloth.compat.constraints import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
