"""Entry point of a probe child process: ``python -m pytest_unsloth.probes NAME``."""

from __future__ import annotations

import sys

from pytest_unsloth.probes import run
from pytest_unsloth.probes.table import PROBE_TABLE

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m pytest_unsloth.probes NAME\n")
        raise SystemExit(2)
    raise SystemExit(run(sys.argv[1], {row.name: row.child_function() for row in PROBE_TABLE}))
