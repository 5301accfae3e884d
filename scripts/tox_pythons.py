"""Say which Pythons the minimal tox envs could use, so a skipped one is seen, not silent.

tox skips an env whose interpreter is missing (skip_missing_interpreters) and still ends with
"congratulations"; this runs as tox's last env and names what was missing. With
``--require-one-of 3.10,3.12,3.13`` (CI) it fails when none of those is on PATH: the minimal
env would then have run on the default Python alone.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

SUPPORTED = ("3.10", "3.11", "3.12", "3.13")


def runs(version: str) -> bool:
    """Whether ``pythonX.Y`` on PATH starts and is that version (a pyenv shim may not be)."""
    path = shutil.which(f"python{version}")
    if path is None:
        return False
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    try:
        proc = subprocess.run([path, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() == version


def main(argv: list[str] | None = None) -> int:
    """Print found and missing interpreters; exit 1 when a required one of them is absent."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-one-of", default="", help="comma-separated versions")
    args = parser.parse_args(argv)
    found = [v for v in SUPPORTED if runs(v)]
    missing = [v for v in SUPPORTED if v not in found]
    print(f"minimal envs: Python {', '.join(found) or 'none'} found on PATH")
    if missing:
        # One Python has several envs (minimal-py310-pytest8, minimal-py310-pytest9, ...).
        envs = ", ".join("minimal-py" + v.replace(".", "") + "-*" for v in missing)
        print(
            f"minimal envs: Python {', '.join(missing)} NOT FOUND: tox skipped {envs}; the plugin "
            "was not tested there (install them, e.g. with pyenv, and put them on PATH)"
        )
    required = [v for v in args.require_one_of.split(",") if v]
    if required and not set(required) & set(found):
        print(f"error: none of Python {', '.join(required)} is on PATH", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
