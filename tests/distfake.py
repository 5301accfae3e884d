"""Write installed-package metadata (``*.dist-info``) and fake importable packages for tests.

importlib.metadata reads these exactly like real installs, so the checks see a drifted or
broken environment without anything being installed.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_dist(
    site: Path,
    name: str,
    version: str | None,
    requires: list[str] | tuple[str, ...] = (),
    requires_python: str | None = None,
    *,
    module: str | None = None,
    code: str = "",
    metadata: bool = True,
) -> Path:
    """Create ``NAME-VERSION.dist-info`` in ``site`` (and a package ``module`` running ``code``)."""
    site.mkdir(parents=True, exist_ok=True)
    folder = site / f"{name.replace('-', '_')}-{version or '0'}.dist-info"
    folder.mkdir()
    if metadata:
        lines = ["Metadata-Version: 2.1", f"Name: {name}"]
        if version is not None:
            lines.append(f"Version: {version}")
        if requires_python:
            lines.append(f"Requires-Python: {requires_python}")
        lines += [f"Requires-Dist: {r}" for r in requires]
        (folder / "METADATA").write_text("\n".join(lines) + "\n", "utf-8")
    (folder / "RECORD").write_text("", "utf-8")
    if module:
        pkg = site / module
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text(textwrap.dedent(code), "utf-8")
    return folder
