"""Entry point of a probe child process."""

from __future__ import annotations

import sys

from pytest_unsloth.probes import run
from pytest_unsloth.probes.kernels import PROBES

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m pytest_unsloth.probes NAME\n")
        raise SystemExit(2)
    raise SystemExit(run(sys.argv[1], PROBES))
