"""The ``arch`` check: every compiled extension against each visible GPU and unsloth_target_arch.

Real bitsandbytes libraries (one per CUDA version, different architectures) and fake extension
libraries written as real ELF files with fat binaries; NVML is faked for the GPU-present cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distfake import write_dist
from fatbinfake import write_extension
from gpuspecs import fake_gpu
from pytest_unsloth.compat import archs
from test_env_scenarios import run_env

BNB = {p.name: archs.read_library(p) for p in archs.distribution_libraries("bitsandbytes")}
needs_bnb = pytest.mark.skipif(
    not any(lib.has_cuda for lib in BNB.values()), reason="bitsandbytes CUDA libraries missing"
)
RTX_5090 = fake_gpu("RTX_5090", uuid="GPU-55555555-2222-3333-4444-555555555555", free_gib=30.0)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on sys.path where tests write fake installs."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("BNB_CUDA_VERSION", raising=False)
    return folder


def fake_extension(
    site: Path, name: str, version: str, cubins: list[int], ptx: list[int] | tuple[int, ...] = ()
):
    """A dist-info whose RECORD lists one extension library with these architectures."""
    folder = write_dist(site, name, version)
    rel = f"{name.replace('-', '_')}/_C.so"
    write_extension(site / rel, cubins, ptx)
    (folder / "RECORD").write_text(f"{rel},,\n")


def _bnb_lacking(cap: tuple[int, int]) -> str | None:
    """A real bitsandbytes CUDA build lacking code for ``cap`` (e.g. cuda126 for sm_120)."""
    for name, lib in sorted(BNB.items()):
        if lib.has_cuda and not lib.runs_on(cap) and archs.cuda_variant(name):
            return name
    return None


@needs_bnb
def test_target_arch_without_gpu_names_the_bitsandbytes_build_that_lacks_it(
    pytester: pytest.Pytester, fake_nvml, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU machine, sm_120 target, bitsandbytes loading an old CUDA build: fails, names the file."""
    lacking = _bnb_lacking((12, 0))
    assert lacking is not None, BNB  # the wheel's CUDA 11/12.x builds stop at sm_90
    cuda = archs.cuda_variant(lacking)
    assert cuda is not None
    monkeypatch.setenv("BNB_CUDA_VERSION", f"{cuda[0]}{cuda[1]}")
    fake_nvml(no_driver=True)
    msg = run_env(pytester, "--unsloth-checks=arch", "--unsloth-target-arch=sm_120").only_failure(
        "arch"
    )
    assert f"{lacking} (bitsandbytes " in msg
    assert "has no code for target sm_120 (--unsloth-target-arch), sm_120" in msg
    assert "no kernel image is available" in msg
    assert "python -m pytest_unsloth.archs bitsandbytes" in msg


@needs_bnb
def test_target_arch_passes_when_the_loaded_build_has_it(
    pytester: pytest.Pytester, fake_nvml, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same target passes with a bitsandbytes build that carries sm_120."""
    good = next(
        (n for n, lib in sorted(BNB.items()) if archs.cuda_variant(n) and lib.runs_on((12, 0))),
        None,
    )
    assert good is not None
    cuda = archs.cuda_variant(good)
    assert cuda is not None
    monkeypatch.setenv("BNB_CUDA_VERSION", f"{cuda[0]}{cuda[1]}")
    fake_nvml(no_driver=True)
    pytester.makepyprojecttoml(
        '[tool.pytest.ini_options]\nunsloth_target_arch = ["sm_90", "sm_120"]\n'
    )
    result = pytester.runpytest("--unsloth-env", "-p", "no:cacheprovider", "-v",
                                "--unsloth-checks=arch")  # fmt: skip
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*unsloth-env::arch PASSED*"])


def test_fake_extension_lacking_the_gpu_on_a_visible_gpu(
    pytester: pytest.Pytester, fake_nvml, site: Path
) -> None:
    """A visible RTX 5090 (sm_120) and an xformers built for sm_80/sm_90 only: names both."""
    fake_nvml(gpus=[RTX_5090], driver="580.159.04", cuda_driver=13000)
    fake_extension(site, "xformers", "0.0.99", [80, 90])
    msg = run_env(pytester, "--unsloth-checks=arch").only_failure("arch")
    assert (
        "_C.so (xformers 0.0.99) has no code for cuda:0 (NVIDIA GeForce RTX 5090), sm_120 "
        "(carries cubins sm_80 sm_90; PTX none)" in msg
    )
    assert "install a build of xformers that lists sm_120" in msg


def test_ptx_for_an_older_arch_covers_a_newer_gpu(
    pytester: pytest.Pytester, fake_nvml, site: Path
) -> None:
    """compute_90 PTX is JIT-compiled for sm_120: the same extension plus PTX passes the GPU."""
    fake_nvml(no_driver=True)
    fake_extension(site, "xformers", "0.0.99", [80, 90], ptx=[90])
    fake_extension(site, "flash-attn", "2.8.0", [80, 90, 100, 120])
    run = run_env(pytester, "--unsloth-checks=arch", "--unsloth-target-arch=sm_120,sm_100")
    assert run.outcomes == {"arch": "passed"}


def test_no_gpu_and_no_target_still_skips(pytester: pytest.Pytester, fake_nvml, site: Path):
    """Without a GPU or a target the check has nothing to compare against."""
    fake_nvml(no_driver=True)
    fake_extension(site, "xformers", "0.0.99", [80])
    run = run_env(pytester, "--unsloth-checks=arch")
    assert run.outcomes == {"arch": "skipped"}


@pytest.mark.parametrize("value", ["hopper", "sm_9"])
def test_bad_target_arch_is_a_usage_error(pytester: pytest.Pytester, value: str) -> None:
    """A bad ini value stops the session with the key, the value and the fix."""
    pytester.makeini(f"[pytest]\nunsloth_target_arch = sm_90 {value}\n")
    result = pytester.runpytest("--unsloth-env")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*ini unsloth_target_arch in tox.ini*{value!r} is not a GPU architecture*sm_XY*Fix:*"]
    )


def test_results_are_cached_under_the_probe_fingerprint(
    pytester: pytest.Pytester, fake_nvml, site: Path
) -> None:
    """A second run reads the cached scan; a changed install (new fingerprint) reads again."""
    fake_nvml(no_driver=True)
    fake_extension(site, "xformers", "0.0.99", [80, 90])
    args = ("--unsloth-env", "--unsloth-checks=arch", "--unsloth-target-arch=sm_90")
    pytester.runpytest(*args).assert_outcomes(passed=1)
    cache_file = pytester.path / ".pytest_cache" / "v" / "unsloth" / "archs"
    entry = json.loads(cache_file.read_text())
    assert entry["fingerprint"] and entry["libs"]["xformers"][0]["sm"] == ["sm_80", "sm_90"]
    # Prove the second run uses the cache: make the cached copy claim sm_80 only.
    entry["libs"]["xformers"][0]["sm"] = ["sm_80"]
    cache_file.write_text(json.dumps(entry))
    assert pytester.runpytest(*args).ret == 1
    # Reinstalling rewrites RECORD, so the fingerprint changes and the libraries are read again.
    record = site / "xformers-0.0.99.dist-info" / "RECORD"
    record.write_text(record.read_text() + "\n")
    pytester.runpytest(*args).assert_outcomes(passed=1)
