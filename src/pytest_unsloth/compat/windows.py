"""Supported version windows that packages keep in code, read from their installed source.

TRL checks the installed vLLM against a window it only warns about at import
(``trl/import_utils.py``, ``is_vllm_available``: ``Version("0.22.0") <= v <= Version("0.31.0")``);
the ``trl[vllm]`` extra says the same, but only for users who installed the extra. Reading the
constants from the installed file (nothing is imported) reports a vLLM outside the window with
the source line as evidence.

Studied and not encoded: unsloth 2026.10.9 and unsloth_zoo 2026.10.9 keep no supported-range
constants for vLLM or transformers; their version comparisons gate individual patches
(``Version(vllm_version) < Version("0.11.0")`` and the like), and the three that raise
(torch/xformers in ``unsloth/models/_utils.py``) are rows of ``known_bad.json``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

# owner distribution, file inside it, function holding the window, package the window is for
SOURCE_WINDOWS: tuple[tuple[str, str, str, str], ...] = (
    ("trl", "trl/import_utils.py", "is_vllm_available", "vllm"),
)

_WINDOW = re.compile(
    r"""Version\(\s*["']([0-9][^"']*)["']\s*\)\s*<=\s*[A-Za-z_][\w.()]*\s*<=\s*"""
    r"""Version\(\s*["']([0-9][^"']*)["']\s*\)"""
)


@dataclasses.dataclass(frozen=True)
class Window:
    """An inclusive ``low <= version <= high`` window found in source, with its evidence."""

    owner: str
    owner_version: str
    target: str
    low: str
    high: str
    path: str
    line: int
    text: str

    @property
    def specifier(self) -> str:
        """``>=0.22.0,<=0.31.0``."""
        return f">={self.low},<={self.high}"

    def contains(self, version: str) -> bool:
        """Whether ``version`` (local label dropped, as the source does) is inside."""
        from packaging.version import InvalidVersion, Version

        try:
            v = Version(Version(version).base_version)
            return Version(self.low) <= v <= Version(self.high)
        except InvalidVersion:
            return True  # unknown versions are not judged


def find_window(source: str, function: str) -> tuple[str, str, int, str] | None:
    """(low, high, 1-based line, line text) of the first window inside ``def function``."""
    m = re.search(rf"^def {re.escape(function)}\b.*?(?=^\S|\Z)", source, re.M | re.S)
    if m is None:
        return None
    w = _WINDOW.search(source, m.start(), m.end())
    if w is None:
        return None
    line = source.count("\n", 0, w.start()) + 1
    return w.group(1), w.group(2), line, source.splitlines()[line - 1].strip()


def read_windows() -> list[Window]:
    """Every window of SOURCE_WINDOWS whose owner is installed (metadata and source only)."""
    import importlib.metadata as md

    out = []
    for owner, rel, function, target in SOURCE_WINDOWS:
        try:
            dist = md.distribution(owner)
            version = dist.version
        except Exception:  # not installed, or unreadable metadata (the packages check's finding)
            continue
        path = Path(str(dist.locate_file(rel)))
        try:
            source = path.read_text("utf-8", errors="replace")
        except OSError:
            continue
        found = find_window(source, function)
        if found is not None:
            low, high, line, text = found
            out.append(Window(owner, version, target, low, high, str(path), line, text))
    return out
