"""The installed version of a distribution, from its metadata (nothing is imported)."""

from __future__ import annotations

import importlib.metadata as md


def version_of(name: str) -> str | None:
    """Installed version of one distribution, or None (metadata only).

    ``""`` when it is installed but its METADATA is unreadable or has no Version (the packages
    check reports that); never raises.
    """
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        return None
    except Exception:  # METADATA that is not UTF-8, a folder where a file should be, ...
        return ""
    return str(version) if version else ""
