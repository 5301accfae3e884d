"""Small truths a first-time user meets: skips and fixes that say what they mean."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distfake import write_dist
from pytest_unsloth.util.versions import version_of


def test_unsloth_not_installed_and_not_required_is_a_skip(pytester: pytest.Pytester) -> None:
    if version_of("unsloth"):
        pytest.skip("unsloth is installed here")
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=unsloth", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["unsloth *skipped *unsloth is not installed (not required)"])


def test_required_unsloth_missing_gets_an_install_line_that_keeps_torch(
    pytester: pytest.Pytester,
) -> None:
    if version_of("unsloth"):
        pytest.skip("unsloth is installed here")
    result = pytester.runpytest(
        "--unsloth-env", "--unsloth-checks=unsloth", "--unsloth-require=unsloth"
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "found: unsloth is not installed (--unsloth-require requires it)" in out
    torch = version_of("torch")
    pin = f" torch=={torch}" if torch else ""
    result.stdout.fnmatch_lines([f"fix:   pip install unsloth unsloth_zoo{pin}*"])
    assert "read the error above" not in out


def test_install_line_pins_the_installed_torch(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A torch the environment holds (metadata is all the check reads): the line must name it.
    site = tmp_path / "site"
    write_dist(site, "torch", "2.11.0+cu130")
    monkeypatch.syspath_prepend(str(site))
    # Prepended, not replaced: where the plugin itself comes from PYTHONPATH (the GPU machine's
    # carried wheels), the child must still find it.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess(
        "--unsloth-env", "--unsloth-checks=xformers", "--unsloth-require=xformers", timeout=120
    )
    result.stdout.fnmatch_lines(
        ["fix:   pip install xformers torch==2.11.0+cu130 (naming the installed torch keeps*"]
    )


def test_requires_kernel_torch_without_a_gpu_says_it_needs_a_gpu(
    pytester: pytest.Pytester,
    fake_nvml: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_nvml(no_driver=True)
    site = tmp_path / "site"
    write_dist(site, "torch", "2.13.0+cpu")
    monkeypatch.syspath_prepend(str(site))
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.requires_kernel("torch")
            def test_t(): pass
            """
        )
    )
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED * needs torch running on a CUDA GPU (requires_kernel('torch') probes CUDA); "
            "its probe did not run: no NVIDIA GPU: NVML says *"
        ]
    )


@pytest.mark.slow
def test_requires_kernel_torch_with_a_gpu_and_a_cpu_torch_names_the_build(
    pytester: pytest.Pytester, fake_nvml: Callable[..., Any]
) -> None:
    # NVML sees a GPU, torch is the real CPU build: the real probe subprocess says so.
    pytest.importorskip("torch")
    import torch

    if torch.version.cuda is not None:
        pytest.skip("torch here is a CUDA build")
    fake_nvml(
        gpus=[
            {
                "name": "NVIDIA L4",
                "uuid": "GPU-1",
                "total_gib": 22.5,
                "free_gib": 20.0,
                "capability": [8, 9],
            }
        ]
    )
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.requires_kernel("torch")
            def test_t(): pass
            """
        )
    )
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED * needs torch running on a CUDA GPU *its probe failed: "
            "torch * is a CPU-only build"
        ]
    )


def test_help_placeholder_keeps_the_unit_case(pytester: pytest.Pytester) -> None:
    out = pytester.runpytest("--help").stdout.str()
    assert "--unsloth-min-free-vram=16000MiB" in out
    assert "16000MIB" not in out
    assert "--unsloth-probe-timeout=SECONDS" in out
