"""Binary memory units, written once: the plugin reports GPU memory in GiB and MiB."""

from __future__ import annotations

GIB = 1024**3
MIB = 1024**2
