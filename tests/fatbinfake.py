"""Synthetic ELF64 shared libraries with CUDA fat binaries, for the fatbin reader's tests."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from pytest_unsloth.compat import archs


def entry(kind: int, arch: int, flags: int = 0x11, payload: bytes = b"\0" * 13) -> bytes:
    """One fatbin entry header (kind 1 PTX, 2 cubin) followed by its padded payload."""
    padded = payload + b"\0" * (-len(payload) % 8)
    head = struct.pack("<HHIQIIII", kind, 0x101, 64, len(padded), len(payload), 0, 0x10008, arch)
    head += struct.pack("<IIQQQ", 0, 0, flags, 0, len(payload))
    assert len(head) == 64
    return head + padded


def fatbin(*entries: bytes) -> bytes:
    """One fat binary: the 16-byte header and the entries."""
    body = b"".join(entries)
    return struct.pack("<IHHQ", archs.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 LE file holding the given sections (plus the name table)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    data = bytearray(b"\0" * 64)
    layout = []
    name_off = 1
    for name, content in [*sections.items(), (".shstrtab", names)]:
        layout.append((name_off, len(data), len(content)))
        name_off += len(name) + 1
        data += content + b"\0" * (-len(content) % 8)
    shoff = len(data)
    data += b"\0" * 64  # the null section
    for n_off, off, size in layout:
        data += struct.pack("<IIQQQQIIQQ", n_off, 1, 0, 0, off, size, 0, 0, 8, 0)
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64,
                          len(layout) + 1, len(layout))  # fmt: skip
    data[:64] = header
    return bytes(data)


def write_extension(path: Path, cubins: Sequence[int], ptx: Sequence[int] = ()) -> None:
    """Write a fake extension library at ``path`` carrying these cubin / PTX arch numbers."""
    entries = [entry(2, a) for a in cubins] + [entry(1, a) for a in ptx]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(elf({".nv_fatbin": fatbin(*entries)}))
