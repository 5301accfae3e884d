"""The plain ``pytest`` console script for this interpreter, as users type it."""

from __future__ import annotations

import sys
from pathlib import Path


def pytest_script(folder: Path) -> str:
    """Path of a ``pytest`` command that runs this interpreter's pytest.

    ``python -m pytest`` puts the current folder on sys.path and ``pytest`` does not, so only
    the console script shows an import that works by accident. The one next to
    ``sys.executable`` is used when it exists; otherwise an identical launcher is written to
    ``folder``.
    """
    script = Path(sys.executable).parent / "pytest"
    if script.is_file():
        return str(script)
    launcher = folder / "pytest"
    launcher.write_text(
        f"#!{sys.executable}\nimport sys\nfrom pytest import console_main\n"
        "sys.exit(console_main())\n"
    )
    launcher.chmod(0o755)
    return str(launcher)
