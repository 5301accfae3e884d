"""Which GPU architectures compiled extensions carry code for, read from their CUDA fat binaries.

"no kernel image is available for execution on the device" means a shared library carries no
cubin that runs on the GPU and no PTX the driver could compile for it. Both are listed in the
fat binaries nvcc embeds in every CUDA shared library, so the question can be answered from the
files alone, without a GPU and without importing anything.

Layout (standard library only, header-only reads of a memory map; each entry's payload, usually
compressed, is skipped):

* ELF64 section headers locate ``.nv_fatbin`` (the executable fat binaries the CUDA runtime
  registers) and ``__nv_relfatbin`` (relocatable device code for device linking).
  ``.nvFatBinSegment`` holds only the registration wrapper pointing into ``.nv_fatbin``.
  Like ``cuobjdump`` without ``-all``, the executable section is read when present, else the
  relocatable one.
* A section holds one or more fat binaries back to back: a 16-byte header (magic 0xBA55ED50,
  u16 version, u16 header size, u64 size of the entries that follow), then entries, each a
  header (u16 kind 1=PTX 2=cubin, u16 version, u32 header size, u64 padded payload size, ...,
  u32 arch at offset 28, e.g. 90 for 9.0, u64 flags at offset 40) followed by its payload.
  Flag 0x100000 marks an architecture-specific (``a``) target: on libcublasLt 12.9 exactly the
  1375 entries cuobjdump lists as sm_90a carry it. Flag 0x200000 marks a family-specific
  (``f``) target: NVIDIA's own ``fatbinary`` (CUDA 13.5.37, PyPI ``nvidia-cuda-nvcc``) sets it
  when a cubin or PTX image is given as ``sm=100f`` / ``sm=120f`` (for the same cubin given as
  ``sm=100`` it is the only header bit that differs); ``cuobjdump -elf`` then prints
  ``arch = sm_100f`` for the entry (``tests/data/family_targets.fatbin`` is that output).
  ``cuobjdump --list-elf`` names such a cubin ``sm_100`` (it drops the ``f``; ``--list-ptx``
  keeps it). Checked against NVIDIA's ``cuobjdump --list-elf/--list-ptx/-elf`` (PyPI
  ``nvidia-cuda-cuobjdump``) in the tests.

Compatibility rules (NVIDIA, Blackwell Compatibility Guide section 1.2,
https://docs.nvidia.com/cuda/blackwell-compatibility-guide/ ; architecture- and family-specific
targets: CUDA Programming Guide, "Feature Set Compiler Targets", and NVIDIA's blog "NVIDIA
Blackwell and NVIDIA CUDA 12.9 Introduce Family-Specific Architecture Features",
https://developer.nvidia.com/blog/nvidia-blackwell-and-nvidia-cuda-12-9-introduce-family-specific-architecture-features/
):

* cubin ``sm_XY`` runs on compute capability X.Z with Z >= Y (same major, equal or higher minor);
* PTX ``compute_XY`` is JIT-compiled by the driver for any X'.Y' >= X.Y;
* ``sm_XYa`` / ``compute_XYa`` run only on exactly X.Y;
* ``sm_XYf`` / ``compute_XYf`` run on the family: same major X, minor >= Y (sm_100f on 10.0 and
  10.3, never on 11.x or 12.x; sm_120f on 12.0 and 12.1). Besides the guide and the blog, the
  rule is stated by ptxas itself (CUDA 13.5 ``ptxas --help``, ``--gpu-name``): "PTX for .target
  sm_XYf can be compiled to GPU targets sm_XZ, sm_XZf, sm_XZa where Z >= Y and sm_XY and sm_XZ
  belong in same family"; ptxas 13.5 compiles ``.target sm_100f`` for sm_100/103/107 and
  refuses sm_110/120/121, and ``.target sm_120f`` for sm_120/121 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import re
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

FATBIN_MAGIC = 0xBA55ED50
_MAGIC_BYTES = struct.pack("<I", FATBIN_MAGIC)
KIND_PTX = 1
KIND_ELF = 2
FLAG_ARCH_SPECIFIC = 0x100000
FLAG_FAMILY_SPECIFIC = 0x200000
EXEC_SECTION = ".nv_fatbin"
REL_SECTION = "__nv_relfatbin"
_SHARED_LIB_RE = re.compile(r"\.so(\.\d+)*$")
_TARGET_RE = re.compile(r"^(sm|compute)_(\d+)([af]?)$")


@dataclasses.dataclass(frozen=True, order=True)
class Target:
    """One compiled target: ``sm_90`` (cubin) or ``compute_90`` (PTX), maybe ``a``/``f``."""

    major: int
    minor: int
    suffix: str = ""  # "", "a" (architecture-specific) or "f" (family-specific)
    ptx: bool = False

    @property
    def name(self) -> str:
        """``sm_90a`` / ``compute_120``."""
        return f"{'compute' if self.ptx else 'sm'}_{self.major}{self.minor}{self.suffix}"

    def runs_on(self, capability: tuple[int, int]) -> bool:
        """Whether a GPU of this compute capability can run this code (NVIDIA's rules above)."""
        major, minor = capability
        if self.suffix == "a":
            return (major, minor) == (self.major, self.minor)
        if self.suffix == "f" or not self.ptx:
            return major == self.major and minor >= self.minor
        return (major, minor) >= (self.major, self.minor)

    @classmethod
    def from_entry(cls, arch: int, kind: int, flags: int) -> Target:
        """The target of one fatbin entry (arch 90 -> 9.0, 121 -> 12.1)."""
        if flags & FLAG_ARCH_SPECIFIC:
            suffix = "a"
        elif flags & FLAG_FAMILY_SPECIFIC:
            suffix = "f"
        else:
            suffix = ""
        return cls(arch // 10, arch % 10, suffix, kind == KIND_PTX)


def parse_capability(text: str) -> tuple[int, int]:
    """``sm_90`` / ``sm_120`` / ``compute_90`` / ``9.0`` / ``12.0`` -> (major, minor).

    Raises ValueError naming the accepted forms.
    """
    t = text.strip().lower()
    m = re.fullmatch(r"(?:sm|compute)_(\d+)[af]?", t)
    if m and len(m.group(1)) >= 2:
        digits = m.group(1)
        return int(digits[:-1]), int(digits[-1])
    m = re.fullmatch(r"(\d+)\.(\d)", t)
    if m:
        return int(m.group(1)), int(m.group(2))
    raise ValueError(
        f"{text!r} is not a GPU architecture; write sm_XY (sm_90 for H100/H200, sm_120 for "
        "RTX 50xx/RTX PRO 6000, sm_100 for B200) or a compute capability like 9.0"
    )


def sm_name(capability: tuple[int, int]) -> str:
    """(9, 0) -> ``sm_90``."""
    return f"sm_{capability[0]}{capability[1]}"


@dataclasses.dataclass(frozen=True)
class LibArchs:
    """The CUDA code one shared library carries."""

    path: str
    sm: tuple[str, ...] = ()
    ptx: tuple[str, ...] = ()
    section: str | None = None  # the section read; None when the file has no CUDA code
    entries: int = 0
    error: str | None = None  # unreadable / not ELF64: the file was not judged

    @property
    def has_cuda(self) -> bool:
        """Whether the library embeds any CUDA device code."""
        return bool(self.sm or self.ptx)

    def targets(self) -> list[Target]:
        """Every cubin and PTX target as a Target."""
        out = []
        for name in (*self.sm, *self.ptx):
            m = _TARGET_RE.match(name)
            if m:
                digits = m.group(2)
                out.append(
                    Target(int(digits[:-1]), int(digits[-1]), m.group(3), m.group(1) == "compute")
                )
        return out

    def runs_on(self, capability: tuple[int, int]) -> bool:
        """Whether any cubin or PTX in the library can run on this compute capability."""
        return any(t.runs_on(capability) for t in self.targets())

    def how(self, capability: tuple[int, int]) -> str:
        """``cubin sm_90`` / ``PTX compute_80 (JIT)`` / ``nothing``: what serves this GPU."""
        targets = self.targets()
        cubins = [t for t in targets if not t.ptx and t.runs_on(capability)]
        if cubins:
            return "cubin " + max(cubins).name
        ptx = [t for t in targets if t.ptx and t.runs_on(capability)]
        if ptx:
            return f"PTX {max(ptx).name} (JIT-compiled at first use)"
        return "nothing"

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` shape: path, sm, ptx (plus section/error when set)."""
        out: dict[str, Any] = {"path": self.path, "sm": list(self.sm), "ptx": list(self.ptx)}
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LibArchs:
        """Inverse of to_json (for the cache)."""
        return cls(
            path=str(data["path"]),
            sm=tuple(data.get("sm", ())),
            ptx=tuple(data.get("ptx", ())),
            section=data.get("section"),
            entries=int(data.get("entries", 0)),
            error=data.get("error"),
        )


def _sort_key(name: str) -> tuple[int, int, str]:
    m = _TARGET_RE.match(name)
    if not m:
        return (0, 0, name)
    digits = m.group(2)
    return (int(digits[:-1]), int(digits[-1]), m.group(3))


def elf_sections(buf: mmap.mmap | bytes) -> dict[str, tuple[int, int]]:
    """Section name -> (file offset, size) of an ELF64 little-endian file.

    Raises ValueError for anything else (the caller reports it as not judged).
    """
    if len(buf) < 64 or buf[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    if buf[4] != 2 or buf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", buf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)
    if shoff == 0 or shnum == 0:
        return {}
    if shentsize < 64 or shoff + shnum * shentsize > len(buf) or shstrndx >= shnum:
        raise ValueError("truncated ELF section header table")
    headers = [struct.unpack_from("<IIQQQQ", buf, shoff + i * shentsize) for i in range(shnum)]
    str_off, str_size = headers[shstrndx][4], headers[shstrndx][5]
    out: dict[str, tuple[int, int]] = {}
    for name_off, sh_type, _flags, _addr, offset, size in headers:
        start = str_off + name_off
        if sh_type == 8 or start >= str_off + str_size:  # SHT_NOBITS: no bytes in the file
            continue
        end = buf.find(b"\0", start, str_off + str_size)
        name = bytes(buf[start : end if end >= 0 else str_off + str_size]).decode(
            "ascii", "replace"
        )
        if offset + size <= len(buf):
            out[name] = (offset, size)
    return out


def fatbin_entries(buf: mmap.mmap | bytes, offset: int, size: int) -> Iterable[Target]:
    """Every entry target of the fat binaries in ``buf[offset:offset+size]`` (headers only)."""
    end = offset + size
    pos = buf.find(_MAGIC_BYTES, offset, end)
    while pos >= 0 and pos + 16 <= end:
        _magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", buf, pos)
        entry = pos + header_size
        container_end = min(entry + fat_size, end)
        while entry + 48 <= container_end:
            kind, _ev, entry_size, payload = struct.unpack_from("<HHIQ", buf, entry)
            if entry_size < 48:
                break  # corrupt: stop this container rather than loop forever
            (arch,) = struct.unpack_from("<I", buf, entry + 28)
            (flags,) = struct.unpack_from("<Q", buf, entry + 40)
            if kind in (KIND_PTX, KIND_ELF) and arch:
                yield Target.from_entry(arch, kind, flags)
            entry += entry_size + payload
        pos = buf.find(_MAGIC_BYTES, max(container_end, pos + 4), end)


def read_library(path: str | os.PathLike[str]) -> LibArchs:
    """The cubin and PTX architectures one shared library carries (never raises)."""
    p = str(path)
    try:
        with open(p, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return LibArchs(p, error="empty file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                sections = elf_sections(buf)
                name = next((n for n in (EXEC_SECTION, REL_SECTION) if n in sections), None)
                if name is None:
                    return LibArchs(p)
                sm: set[str] = set()
                ptx: set[str] = set()
                count = 0
                for target in fatbin_entries(buf, *sections[name]):
                    count += 1
                    (ptx if target.ptx else sm).add(target.name)
    except (OSError, ValueError, struct.error) as exc:
        return LibArchs(p, error=str(exc) or type(exc).__name__)
    return LibArchs(
        p,
        sm=tuple(sorted(sm, key=_sort_key)),
        ptx=tuple(sorted(ptx, key=_sort_key)),
        section=name,
        entries=count,
    )


def is_shared_library(name: str) -> bool:
    """``libx.so``, ``libx.so.12``, ``_C.abi3.so``."""
    return bool(_SHARED_LIB_RE.search(name))


def distribution_libraries(name: str) -> list[Path]:
    """The shared libraries an installed distribution's RECORD lists (empty when not installed)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(name)
    except Exception:  # not installed, or metadata that cannot be read
        return []
    out = []
    for rel in _record_paths(dist):
        if is_shared_library(rel):
            located = Path(str(dist.locate_file(rel)))
            if located.is_file():
                out.append(located)
    return sorted(set(out))


def _record_paths(dist: Any) -> list[str]:
    """Paths a distribution's RECORD lists, tolerating blank or malformed rows.

    ``Distribution.files`` raises TypeError on a blank RECORD line; a broken install must not
    crash the check, so the rows are read here.
    """
    import csv

    try:
        text = dist.read_text("RECORD") or ""
    except (OSError, UnicodeDecodeError):
        return []
    try:
        return [row[0] for row in csv.reader(text.splitlines()) if row and row[0]]
    except csv.Error:
        return [line.split(",", 1)[0] for line in text.splitlines() if line.strip()]


def expand(spec: str) -> list[Path]:
    """A file, a folder (searched recursively for shared libraries) or a distribution name."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and is_shared_library(q.name))
    return distribution_libraries(spec)


def cuda_variant(lib: str) -> tuple[int, int] | None:
    """``libbitsandbytes_cuda128.so`` -> (12, 8): one of several per-CUDA builds, or None."""
    m = re.search(r"_cuda(\d+)(\d)\.so", os.path.basename(lib))
    return (int(m.group(1)), int(m.group(2))) if m else None


def loaded_variants(libs: Sequence[LibArchs], cuda: tuple[int, int] | None) -> list[LibArchs]:
    """Drop per-CUDA builds (bitsandbytes' ``_cudaXY``) other than the one ``cuda`` loads.

    Without a known CUDA version, or when no build matches it, every library is kept.
    """
    if cuda is None:
        return list(libs)
    variants = [lib for lib in libs if cuda_variant(lib.path) is not None]
    chosen = [lib for lib in variants if cuda_variant(lib.path) == cuda]
    if not chosen:
        return list(libs)
    return [lib for lib in libs if cuda_variant(lib.path) is None or lib in chosen]


def torch_cuda_version(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The CUDA version bitsandbytes picks its library for, read without importing anything.

    ``BNB_CUDA_VERSION`` (e.g. ``128``) overrides, as in bitsandbytes; else the ``+cuXYZ`` tag
    of torch's version, else the ``cuda = '12.8'`` constant in ``torch/version.py``.
    """
    import importlib.metadata as md

    env = os.environ if environ is None else environ
    override = env.get("BNB_CUDA_VERSION", "").strip()
    m = re.fullmatch(r"(\d+)(\d)", override)
    if m:
        return int(m.group(1)), int(m.group(2))
    try:
        dist = md.distribution("torch")
        version = str(dist.version or "")
    except Exception:  # not installed, or metadata that cannot be read
        return None
    m = re.search(r"\+cu(\d+)(\d)\b", version)
    if m:
        return int(m.group(1)), int(m.group(2))
    try:
        text = Path(str(dist.locate_file("torch/version.py"))).read_text()
    except OSError:
        return None
    m = re.search(r"^cuda\b[^=\n]*=\s*['\"](\d+)\.(\d+)", text, re.M)
    return (int(m.group(1)), int(m.group(2))) if m else None


def scan_distributions(names: Iterable[str]) -> dict[str, list[LibArchs]]:
    """Distribution -> its shared libraries that carry CUDA code (or could not be read)."""
    out: dict[str, list[LibArchs]] = {}
    for name in names:
        libs = [read_library(p) for p in distribution_libraries(name)]
        kept = [lib for lib in libs if lib.has_cuda or lib.error]
        if kept:
            out[name] = kept
    return out


@dataclasses.dataclass(frozen=True)
class Gap:
    """A library that carries no code a GPU (or a target architecture) can run."""

    dist: str
    lib: LibArchs
    capability: tuple[int, int]
    target: str  # "cuda:0 NVIDIA H200" or "target sm_120 (ini unsloth_target_arch ...)"


def find_gaps(
    scanned: dict[str, list[LibArchs]],
    targets: Sequence[tuple[str, tuple[int, int]]],
    cuda: tuple[int, int] | None,
) -> list[Gap]:
    """Every (library, target) pair where the library has nothing that runs on the target.

    Per-CUDA builds other than the one ``cuda`` loads are ignored; when ``cuda`` is unknown, a
    distribution with per-CUDA builds counts as covered if any of its builds runs.
    """
    gaps = []
    for dist, libs in scanned.items():
        judged = [lib for lib in loaded_variants(libs, cuda) if lib.has_cuda]
        for label, cap in targets:
            missing = [lib for lib in judged if not lib.runs_on(cap)]
            variants = [lib for lib in judged if cuda_variant(lib.path)]
            if cuda is None and len(variants) > 1:
                covered = any(lib.runs_on(cap) for lib in variants)
                missing = [lib for lib in missing if not (covered and lib in variants)]
            gaps += [Gap(dist, lib, cap, label) for lib in missing]
    return gaps


def _format_text(results: Sequence[LibArchs]) -> str:
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.path}: not read ({r.error})")
        elif not r.has_cuda:
            lines.append(f"{r.path}: no CUDA device code")
        else:
            lines.append(
                f"{r.path}: sm: {' '.join(r.sm) or '-'}; ptx: {' '.join(r.ptx) or '-'}"
                f" ({r.entries} entries in {r.section})"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pytest_unsloth.archs [--json] [--all] PATH_OR_DISTRIBUTION...``."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_unsloth.archs",
        description="List the CUDA cubin (sm_XY) and PTX (compute_XY) architectures embedded "
        "in shared libraries, read from their fat binaries without a GPU.",
    )
    parser.add_argument(
        "specs",
        nargs="+",
        metavar="PATH_OR_DISTRIBUTION",
        help="a shared library, a folder, or an installed distribution name (torch, "
        "bitsandbytes, vllm...)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument(
        "--all", action="store_true", help="also list libraries without CUDA device code"
    )
    args = parser.parse_args(argv)
    results: list[LibArchs] = []
    missing = []
    for spec in args.specs:
        paths = expand(spec)
        if not paths:
            missing.append(spec)
        results += [read_library(p) for p in paths]
    shown = [r for r in results if args.all or r.has_cuda or r.error]
    if args.json:
        print(json.dumps([r.to_json() for r in shown], indent=2))
    elif shown:
        print(_format_text(shown))
    for spec in missing:
        print(
            f"{spec}: neither a file, a folder nor an installed distribution with shared libraries",
            file=sys.stderr,
        )
    return 2 if missing and not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
