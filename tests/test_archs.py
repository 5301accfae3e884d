"""The fatbin reader against NVIDIA's cuobjdump on real libraries; CUDA's compatibility rules."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fatbinfake import elf as _elf
from fatbinfake import entry as _entry
from fatbinfake import fatbin as _fatbin
from pytest_unsloth.compat import archs
from pytest_unsloth.compat.archs import LibArchs, Target


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations or () if spec else ():
        for cand in sorted(Path(root).glob("cu*/bin/cuobjdump")) + sorted(
            Path(root).glob("cuda_cuobjdump/bin/cuobjdump")
        ):
            return str(cand)
    return None


CUOBJDUMP = _cuobjdump()


def _bnb_libs() -> list[Path]:
    return [p for p in archs.distribution_libraries("bitsandbytes") if p.suffix == ".so"]


def _cuobjdump_sets(lib: Path) -> tuple[set[str], set[str], str]:
    """cuobjdump's cubin and PTX architectures (PTX files are named ``*.sm_XY.ptx``).

    The third item is cuobjdump's fatal error, if it gave up part way.
    """
    assert CUOBJDUMP is not None
    sm: set[str] = set()
    ptx: set[str] = set()
    fatal = ""
    for flag, out, ext in (("--list-elf", sm, "cubin"), ("--list-ptx", ptx, "ptx")):
        run = subprocess.run(
            [CUOBJDUMP, flag, str(lib)], capture_output=True, text=True, timeout=120, check=False
        )
        for m in re.finditer(rf"\.sm_(\d+[af]?)\.{ext}$", run.stdout, re.M):
            out.add(("sm_" if ext == "cubin" else "compute_") + m.group(1))
        if "fatal" in run.stderr:
            fatal = run.stderr.strip()
    return sm, ptx, fatal


def _list_elf_name(sm: str) -> str:
    """How ``cuobjdump --list-elf`` names a cubin: ``sm_100f`` is listed as ``sm_100``."""
    return sm.removesuffix("f")


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump unavailable (pip nvidia-cuda-cuobjdump)")
@pytest.mark.skipif(not _bnb_libs(), reason="bitsandbytes with compiled libraries not installed")
def test_agrees_with_cuobjdump_on_every_bitsandbytes_library() -> None:
    """Same cubin and PTX sets as NVIDIA's cuobjdump, library by library, CUDA or not."""
    libs = _bnb_libs()
    cuda_libs = [p for p in libs if archs.cuda_variant(str(p))]
    assert len(cuda_libs) >= 2, libs  # the wheel ships one per CUDA version
    distinct = set()
    agreed = []
    for lib in libs:
        ours = archs.read_library(lib)
        assert ours.error is None, ours
        sm, ptx, fatal = _cuobjdump_sets(lib)
        if fatal:
            # cuobjdump 13.x decompresses each cubin and gives up on some CUDA 12.1 builds
            # ("Invalid ELF") after listing the first; what it did list must still agree.
            assert sm <= {_list_elf_name(n) for n in ours.sm} and ptx <= set(ours.ptx), fatal
        else:
            assert ({_list_elf_name(n) for n in ours.sm}, set(ours.ptx)) == (sm, ptx), lib.name
            agreed.append(lib.name)
        if archs.cuda_variant(str(lib)):
            assert ours.sm, lib.name  # each CUDA build carries cubins
            distinct.add(ours.sm)
    assert len([n for n in agreed if archs.cuda_variant(n)]) >= len(cuda_libs) - 1, agreed
    assert len(distinct) >= 2  # different CUDA builds really carry different arch sets


@pytest.mark.parametrize(
    ("target", "capability", "runs"),
    [
        (Target(8, 0), (8, 6), True),  # cubin: same major, higher minor
        (Target(8, 6), (8, 0), False),  # ... never a lower minor
        (Target(8, 0), (9, 0), False),  # ... never another major
        (Target(9, 0), (12, 0), False),
        (Target(8, 0, ptx=True), (9, 0), True),  # PTX: JIT for anything newer
        (Target(12, 0, ptx=True), (9, 0), False),
        (Target(9, 0, "a"), (9, 0), True),  # arch-specific: exactly that GPU
        (Target(10, 0, "a"), (10, 3), False),
        (Target(9, 0, "a", ptx=True), (10, 0), False),
        (Target(10, 0, "f"), (10, 3), True),  # family-specific: same major, minor >= Y
        (Target(10, 0, "f"), (12, 0), False),
        (Target(12, 0, "f", ptx=True), (12, 1), True),
        (Target(12, 1, "f"), (12, 0), False),
    ],
)
def test_cuda_compatibility_rules(target: Target, capability: tuple[int, int], runs: bool) -> None:
    """NVIDIA's documented rules for cubin, PTX, a and f targets."""
    assert target.runs_on(capability) is runs


@pytest.mark.parametrize(
    ("text", "cap"),
    [("sm_90", (9, 0)), ("SM_120", (12, 0)), ("compute_86", (8, 6)), ("9.0", (9, 0)),
     ("12.1", (12, 1)), ("sm_90a", (9, 0)), ("sm_100f", (10, 0)), ("sm_120f", (12, 0))],
)  # fmt: skip
def test_parse_capability(text: str, cap: tuple[int, int]) -> None:
    """The forms a user writes for a target GPU."""
    assert archs.parse_capability(text) == cap


@pytest.mark.parametrize("text", ["hopper", "sm_9", "90", "sm-90", ""])
def test_parse_capability_rejects_with_the_accepted_forms(text: str) -> None:
    """A bad value names itself and the forms that work."""
    with pytest.raises(ValueError, match=r"sm_XY .*sm_90"):
        archs.parse_capability(text)


# ---------------------------------------------------------------------------------------------
# Synthetic ELF files: the a-flag, PTX, several containers, garbage.


def test_reads_arch_specific_ptx_and_several_containers(tmp_path: Path) -> None:
    """sm_90a (flag 0x100000), PTX entries and a second fat binary in the same section."""
    fat = _fatbin(_entry(2, 80), _entry(2, 90, 0x100011), _entry(1, 90, 0x11))
    fat2 = _fatbin(_entry(2, 120), _entry(1, 52))
    lib = tmp_path / "libx.so"
    lib.write_bytes(_elf({".text": b"\x90" * 40, ".nv_fatbin": fat + b"\0" * 8 + fat2}))
    got = archs.read_library(lib)
    assert got.error is None
    assert got.sm == ("sm_80", "sm_90a", "sm_120")
    assert got.ptx == ("compute_52", "compute_90")
    assert got.entries == 5
    assert got.how((9, 0)) == "cubin sm_90a"
    assert got.how((10, 0)).startswith("PTX compute_90")
    assert got.runs_on((8, 6)) and got.runs_on((12, 1))


def test_reads_family_specific_cubins_and_ptx(tmp_path: Path) -> None:
    """Flag 0x200000 is an ``f`` target (sm_100f, sm_120f) and gets the family rule."""
    fat = _fatbin(
        _entry(2, 90, 0x100011),
        _entry(2, 100, archs.FLAG_FAMILY_SPECIFIC | 0x11),
        _entry(2, 120, archs.FLAG_FAMILY_SPECIFIC | 0x11),
        _entry(1, 100, archs.FLAG_FAMILY_SPECIFIC | 0x8011),
    )
    lib = tmp_path / "libf.so"
    lib.write_bytes(_elf({".nv_fatbin": fat}))
    got = archs.read_library(lib)
    assert got.sm == ("sm_90a", "sm_100f", "sm_120f")
    assert got.ptx == ("compute_100f",)
    assert got.how((10, 3)) == "cubin sm_100f"  # B300: same family, higher minor
    assert got.how((12, 1)) == "cubin sm_120f"  # DGX Spark
    assert got.how((11, 0)) == "nothing"  # compute_100f is never JIT-compiled for 11.x
    assert got.runs_on((9, 0))  # sm_90a serves exactly 9.0
    assert not got.runs_on((8, 9))


# Made with NVIDIA's tools from PyPI nvidia-cuda-nvcc 13.5.37 (no GPU needed): a PTX file with
# one empty kernel (`.version 9.0`, `.target sm_100f` / `sm_120f`; `.version 8.0`, `.target
# sm_90` for the Hopper pair), `ptxas -arch=sm_90|sm_90a|sm_100f|sm_120f k.ptx -o k_X.cubin`,
# then `fatbinary --compress-all --create=family_targets.fatbin --image3=kind=elf,sm=90,file=...
# --image3=kind=elf,sm=90a,... --image3=kind=elf,sm=100f,... --image3=kind=elf,sm=120f,...
# --image3=kind=ptx,sm=100f,... --image3=kind=ptx,sm=100a,...`. 4.6 KB.
FAMILY_SAMPLE = Path(__file__).parent / "data" / "family_targets.fatbin"


def test_real_fatbinary_output_with_family_targets(tmp_path: Path) -> None:
    """NVIDIA's fatbinary marks sm=100f/120f images with the flag the reader recognises."""
    lib = tmp_path / "libsample.so"
    lib.write_bytes(_elf({".nv_fatbin": FAMILY_SAMPLE.read_bytes()}))
    got = archs.read_library(lib)
    assert got.error is None and got.entries == 6
    assert got.sm == ("sm_90", "sm_90a", "sm_100f", "sm_120f")
    assert got.ptx == ("compute_100a", "compute_100f")
    assert [got.how(c) for c in [(9, 0), (10, 0), (10, 3), (12, 0), (12, 1), (11, 0)]] == [
        "cubin sm_90a",
        "cubin sm_100f",
        "cubin sm_100f",
        "cubin sm_120f",
        "cubin sm_120f",
        "nothing",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest_unsloth.archs", "--json", str(lib)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(run.stdout) == [
        {
            "path": str(lib),
            "sm": ["sm_90", "sm_90a", "sm_100f", "sm_120f"],
            "ptx": ["compute_100a", "compute_100f"],
        }
    ]


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump unavailable (pip nvidia-cuda-cuobjdump)")
def test_family_sample_agrees_with_cuobjdump() -> None:
    """cuobjdump -elf names each entry's arch with its a/f suffix; the reader agrees."""
    assert CUOBJDUMP is not None
    run = subprocess.run(
        [CUOBJDUMP, "-elf", str(FAMILY_SAMPLE)], capture_output=True, text=True, timeout=60
    )
    listed = re.findall(r"^Fatbin (elf|ptx) code:\n=+\narch = sm_(\d+[af]?)$", run.stdout, re.M)
    theirs = sorted(("sm_" if k == "elf" else "compute_") + a for k, a in listed)
    data = FAMILY_SAMPLE.read_bytes()
    ours = [t.name for t in archs.fatbin_entries(data, 0, len(data))]
    assert theirs == sorted(ours), run.stdout[-2000:]


def test_executable_section_wins_over_relocatable(tmp_path: Path) -> None:
    """Like cuobjdump: __nv_relfatbin is read only when there is no .nv_fatbin."""
    lib = tmp_path / "liby.so"
    rel = _fatbin(_entry(2, 75))
    lib.write_bytes(_elf({"__nv_relfatbin": rel, ".nv_fatbin": _fatbin(_entry(2, 90))}))
    assert archs.read_library(lib).sm == ("sm_90",)
    lib.write_bytes(_elf({"__nv_relfatbin": rel}))
    assert archs.read_library(lib).sm == ("sm_75",)


@pytest.mark.parametrize(
    ("content", "error"),
    [(b"", "empty"), (b"#!/bin/sh\n" * 10, "not an ELF"), (b"\x7fELF" + b"\1\1" + b"\0" * 90,
     "64-bit")],
)  # fmt: skip
def test_unreadable_files_are_reported_not_raised(
    tmp_path: Path, content: bytes, error: str
) -> None:
    """Garbage is an error on the result, never an exception."""
    f = tmp_path / "bad.so"
    f.write_bytes(content)
    got = archs.read_library(f)
    assert got.error and error in got.error
    assert not got.has_cuda


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=256), st.integers(0, 200))
def test_corrupt_fatbins_never_raise_or_hang(tail: bytes, cut: int) -> None:
    """Random bytes after a valid header, and truncated sections, end the walk cleanly."""
    fat = _fatbin(_entry(2, 90)) + struct.pack("<IHHQ", archs.FATBIN_MAGIC, 1, 16, 10**12) + tail
    image = _elf({".nv_fatbin": fat[: max(16, len(fat) - cut)]})
    list(archs.fatbin_entries(image, 64, len(fat)))
    sections = archs.elf_sections(image)
    assert ".nv_fatbin" in sections


def test_loaded_variants_keeps_only_the_bitsandbytes_build_for_this_cuda() -> None:
    """bitsandbytes loads libbitsandbytes_cudaXY for torch's CUDA only."""
    libs = [
        LibArchs("/x/libbitsandbytes_cuda126.so", sm=("sm_90",)),
        LibArchs("/x/libbitsandbytes_cuda128.so", sm=("sm_120",)),
        LibArchs("/x/_C.so", sm=("sm_80",)),
    ]
    assert [lib.path for lib in archs.loaded_variants(libs, (12, 8))] == [
        "/x/libbitsandbytes_cuda128.so",
        "/x/_C.so",
    ]
    assert archs.loaded_variants(libs, None) == libs
    assert archs.loaded_variants(libs, (11, 8)) == libs  # no build matches: judge all


def test_cli_json_lists_path_sm_ptx(tmp_path: Path) -> None:
    """``python -m pytest_unsloth.archs --json`` prints the documented shape."""
    lib = tmp_path / "pkg" / "libz.so.12"
    lib.parent.mkdir()
    lib.write_bytes(_elf({".nv_fatbin": _fatbin(_entry(2, 86), _entry(1, 90))}))
    (tmp_path / "pkg" / "libcpu.so").write_bytes(_elf({".text": b"\0" * 8}))
    run = subprocess.run(
        [sys.executable, "-m", "pytest_unsloth.archs", "--json", str(tmp_path / "pkg")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(run.stdout) == [{"path": str(lib), "sm": ["sm_86"], "ptx": ["compute_90"]}]


def test_cli_unknown_spec_exits_2() -> None:
    """A name that is neither a file nor an installed distribution says so."""
    assert archs.main(["no-such-dist-xyz"]) == 2


@pytest.mark.skipif(not _bnb_libs(), reason="bitsandbytes with compiled libraries not installed")
def test_cli_distribution_name(capsys: pytest.CaptureFixture[str]) -> None:
    """A distribution name lists its CUDA libraries, CPU-only ones left out without --all."""
    assert archs.main(["bitsandbytes"]) == 0
    out = capsys.readouterr().out
    assert "libbitsandbytes_cuda" in out and "sm_90" in out
    assert "libbitsandbytes_cpu" not in out


@pytest.mark.gpu
def test_torch_cuda_library_matches_torch_arch_list() -> None:
    """On the GPU machine: libtorch_cuda carries every sm_ in torch.cuda.get_arch_list(), and
    code for each visible GPU."""
    code = (
        "import json, torch; print(json.dumps([torch.cuda.get_arch_list(), "
        "[list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    arch_list, caps = json.loads(run.stdout.strip().splitlines()[-1])
    libs = [archs.read_library(p) for p in archs.distribution_libraries("torch")]
    lib = next(x for x in libs if "libtorch_cuda" in x.path and x.has_cuda)
    assert {a for a in arch_list if a.startswith("sm_")} <= set(lib.sm), (arch_list, lib)
    assert caps and all(lib.runs_on((c[0], c[1])) for c in caps), (caps, lib)
