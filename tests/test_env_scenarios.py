"""Broken environments, one per test: the exact check that fails and what it says.

Installed metadata is faked with ``*.dist-info`` folders on a temporary sys.path entry, NVML with
the fake ``pynvml`` (only for the GPU-present branch), kernels with fake packages that hang or
crash at import. Everything else is the real environment of the test run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

from distfake import write_dist
from gpuspecs import fake_gpu

HAS_TORCH = importlib.util.find_spec("torch") is not None
H100 = fake_gpu("H100", uuid="GPU-11111111-2222-3333-4444-555555555555", free_gib=79.0)


@dataclass
class EnvRun:
    """Outcome of one ``pytest --unsloth-env`` run, per check."""

    outcomes: dict[str, str]
    text: dict[str, str]
    output: str
    ret: int

    def failed(self) -> set[str]:
        return {n for n, o in self.outcomes.items() if o == "failed"}

    def only_failure(self, name: str) -> str:
        """Assert that ``name`` is the one check that failed; return its failure text."""
        assert self.failed() == {name}
        return self.text[name]


def run_env(pytester: pytest.Pytester, *args: str) -> EnvRun:
    """Run the checks in-process and collect each check's outcome and failure text."""
    result = pytester.runpytest("--unsloth-env", "-p", "no:cacheprovider", *args)
    outcomes: dict[str, str] = {}
    text: dict[str, str] = {}
    for rep in result.reprec.getreports("pytest_runtest_logreport"):  # type: ignore[attr-defined]
        if not rep.nodeid.startswith("unsloth-env::"):
            continue
        name = rep.nodeid.split("::", 1)[1]
        if rep.when == "call" or rep.outcome != "passed":
            outcomes[name] = rep.outcome
            text[name] = str(rep.longrepr) if rep.longrepr else ""
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    return EnvRun(outcomes, text, out, int(result.ret))


# ----------------------------------------------------------------------------------------------
# Metadata: pins, packages, python


def test_unsloth_trl_drift_is_caught_with_a_computed_fix(pytester: pytest.Pytester, site: Path):
    write_dist(
        site, "unsloth", "2026.10.9", ["trl!=0.19.0,<=1.15.0,>=0.18.2", "unsloth_zoo>=2026.10.9"]
    )
    write_dist(site, "unsloth_zoo", "2026.10.9")
    write_dist(site, "trl", "1.16.0")
    run = run_env(pytester, "--unsloth-checks=pins")
    assert run.failed() == {"pins"}
    assert run.ret == 1
    msg = run.text["pins"]
    assert (
        "found: unsloth 2026.10.9 requires trl>=0.18.2,!=0.19.0,<=1.15.0; trl 1.16.0 is "
        "installed" in msg
    )
    assert "fix:   pip install 'trl>=0.18.2,!=0.19.0,<=1.15.0'" in msg
    assert "Traceback" not in msg


def test_missing_dependency_of_a_stack_package(pytester: pytest.Pytester, site: Path):
    write_dist(site, "unsloth", "2026.10.9", ["unsloth_zoo>=2026.10.9"])
    run = run_env(pytester, "--unsloth-checks=pins")
    assert run.failed() == {"pins"}
    assert (
        "unsloth 2026.10.9 requires unsloth-zoo>=2026.10.9; unsloth-zoo is not installed"
        in run.text["pins"]
    )
    assert "pip install 'unsloth-zoo>=2026.10.9'" in run.text["pins"]


def test_disjoint_ranges_say_no_version_fits(pytester: pytest.Pytester, site: Path):
    write_dist(site, "unsloth", "2026.10.9", ["trl<1.0"])
    write_dist(site, "vllm", "0.11.0", ["trl>=1.5"])
    write_dist(site, "trl", "1.16.0")
    run = run_env(pytester, "--unsloth-checks=pins")
    assert run.failed() == {"pins"}
    assert "no trl version satisfies unsloth (<1.0), vllm (>=1.5)" in run.text["pins"]


def test_marker_and_extra_requirements_are_not_enforced(pytester: pytest.Pytester, site: Path):
    write_dist(
        site,
        "unsloth",
        "2026.10.9",
        [
            # An extra counts only when all its packages are installed (issue 14).
            'trl<0.1; extra == "huggingface"',
            'zzz-not-installed-pkg; extra == "huggingface"',
            'vllm<0.1; python_version < "3.0"',
        ],
    )
    run = run_env(pytester, "--unsloth-checks=pins")
    assert run.outcomes["pins"] == "passed"


def test_requires_python_mismatch(pytester: pytest.Pytester, site: Path):
    write_dist(site, "unsloth", "2026.10.9", requires_python=">=3.99")
    run = run_env(pytester, "--unsloth-checks=python")
    assert run.failed() == {"python"}
    assert "unsloth 2026.10.9 requires Python >=3.99" in run.text["python"]
    assert "fix:   use a Python matching >=3.99" in run.text["python"]


def test_required_package_missing(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_require = unsloth definitely-not-installed\n")
    run = run_env(pytester, "--unsloth-checks=packages")
    assert run.failed() == {"packages"}
    assert "required but not installed: unsloth, definitely-not-installed" in run.text["packages"]
    assert "ini unsloth_require in tox.ini" in run.text["packages"]
    assert "pip install unsloth definitely-not-installed" in run.text["packages"]


def test_broken_metadata(pytester: pytest.Pytester, site: Path):
    write_dist(site, "xformers", None)
    run = run_env(pytester, "--unsloth-checks=packages")
    assert run.failed() == {"packages"}
    assert "metadata has no Version" in run.text["packages"]


def test_shadowed_second_install(
    pytester: pytest.Pytester, site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    write_dist(site, "vllm", "0.11.0")
    later = tmp_path / "later"
    write_dist(later, "vllm", "0.9.2")
    monkeypatch.syspath_prepend(str(site))
    import sys

    sys.path.append(str(later))
    try:
        run = run_env(pytester, "--unsloth-checks=packages")
    finally:
        sys.path.remove(str(later))
    assert run.failed() == {"packages"}
    assert "vllm 0.11.0" in run.text["packages"]
    assert "shadows vllm 0.9.2 (in " in run.text["packages"]


# ----------------------------------------------------------------------------------------------
# Known-bad table: one test per row


def test_known_bad_transformers5_with_old_bitsandbytes(pytester: pytest.Pytester, site: Path):
    write_dist(site, "transformers", "5.17.0")
    write_dist(site, "bitsandbytes", "0.45.5")
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.failed() == {"known-bad"}
    assert "found: transformers 5.17.0 with bitsandbytes 0.45.5" in run.text["known-bad"]
    assert "BITSANDBYTES_MIN_VERSION" in run.text["known-bad"]
    assert "fix:   pip install 'bitsandbytes>=0.46.1'" in run.text["known-bad"]


@pytest.mark.parametrize("bnb", ["0.46.0", "0.48.0"])
def test_known_bad_unsloth_with_excluded_bitsandbytes(
    pytester: pytest.Pytester, site: Path, bnb: str
):
    write_dist(site, "unsloth", "2026.10.9")
    write_dist(site, "bitsandbytes", bnb)
    write_dist(site, "transformers", "4.57.0")
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.failed() == {"known-bad"}
    assert f"unsloth 2026.10.9 with bitsandbytes {bnb}" in run.text["known-bad"]


def test_known_bad_trl_without_grpo(pytester: pytest.Pytester, site: Path):
    write_dist(site, "trl", "0.13.0")
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.failed() == {"known-bad"}
    assert "trl 0.13.0 has no GRPOTrainer" in run.text["known-bad"]
    assert "pip install 'trl>=0.14'" in run.text["known-bad"]


def test_known_bad_unsloth_trl_floor(pytester: pytest.Pytester, site: Path):
    write_dist(site, "unsloth", "2025.10.9")
    write_dist(site, "trl", "0.18.1")
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.failed() == {"known-bad"}
    assert "unsloth 2025.10.9 with trl 0.18.1" in run.text["known-bad"]


def test_known_bad_torchvision_declared_for_another_torch(pytester: pytest.Pytester, site: Path):
    write_dist(site, "torch", "2.13.0+cpu")
    write_dist(site, "torchvision", "0.24.1", ["torch==2.9.1"])
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.failed() == {"known-bad"}
    assert (
        "torchvision 0.24.1 was built for torch==2.9.1, torch 2.13.0+cpu is installed"
        in run.text["known-bad"]
    )
    assert "torchvision::nms does not exist" in run.text["known-bad"]


def test_known_bad_torchvision_pairing_without_metadata(pytester: pytest.Pytester, site: Path):
    write_dist(site, "torch", "2.13.0")
    write_dist(site, "torchvision", "0.24.1")
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert run.failed() == {"known-bad"}
    assert "torch 2.13 pairs with torchvision 0.28" in run.text["known-bad"]
    assert "pip install 'torchvision==0.28.*'" in run.text["known-bad"]


def test_known_bad_table_rows_each_have_reason_and_source():
    from pytest_unsloth.checks.env import RULES, load_known_bad

    rows = load_known_bad()
    assert len(rows) >= 6
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    for row in rows:
        assert row["why"] and row["source"]
        assert ("rule" in row and row["rule"] in RULES) or (row["when"] and row["fix"])


# ----------------------------------------------------------------------------------------------
# User pins


def test_user_pin_violated(pytester: pytest.Pytester, site: Path):
    write_dist(site, "trl", "1.16.0")
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nunsloth_pins = ["trl>=0.20,<1.16"]\n')
    run = run_env(pytester, "--unsloth-checks=user-pins")
    assert run.failed() == {"user-pins"}
    assert "trl 1.16.0 does not satisfy the pin 'trl>=0.20,<1.16'" in run.text["user-pins"]
    assert "pip install 'trl>=0.20,<1.16'" in run.text["user-pins"]
    assert "ini unsloth_pins in pyproject.toml" in run.text["user-pins"]


def test_user_pin_on_missing_package(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_pins =\n    not-installed-pkg>=1.0\n")
    run = run_env(pytester, "--unsloth-checks=user-pins")
    assert run.failed() == {"user-pins"}
    assert "not-installed-pkg is not installed (pinned >=1.0)" in run.text["user-pins"]


# ----------------------------------------------------------------------------------------------
# GPU side, with a fake NVML


def test_no_gpu_skips_gpu_checks_with_nvml_reason(pytester: pytest.Pytester, fake_nvml):
    fake_nvml(no_driver=True)
    run = run_env(pytester, "--unsloth-checks=cuda,driver,arch,bf16,vram,bitsandbytes", "-rs")
    assert set(run.outcomes.values()) == {"skipped"}
    assert "no NVIDIA GPU: NVML says NVML Shared Library Not Found" in run.output


def test_require_gpu_turns_no_gpu_into_a_failure(pytester: pytest.Pytester, fake_nvml):
    fake_nvml(no_driver=True)
    run = run_env(pytester, "--unsloth-checks=cuda", "--unsloth-require-gpu")
    assert run.failed() == {"cuda"}
    assert "no usable NVIDIA GPU (NVML says NVML Shared Library Not Found)" in run.text["cuda"]


def test_cuda_visible_devices_hides_every_gpu(
    pytester: pytest.Pytester, fake_nvml, monkeypatch: pytest.MonkeyPatch
):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    run = run_env(pytester, "--unsloth-checks=cuda,vram")
    # One root cause, reported once: vram defers to the cuda check (issue 11).
    assert run.failed() == {"cuda"}
    assert run.outcomes["vram"] == "skipped"
    assert "see unsloth-env::cuda" in run.text["vram"]
    assert "CUDA_VISIBLE_DEVICES='' hides all 1 GPU(s) NVML sees" in run.text["cuda"]


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch installed")
@pytest.mark.slow
def test_nvml_sees_gpu_but_torch_is_a_cpu_build(pytester: pytest.Pytester, fake_nvml):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    run = run_env(pytester, "--unsloth-checks=cuda,arch")
    assert run.failed() == {"cuda"}
    assert run.outcomes["arch"] == "skipped"
    msg = run.text["cuda"]
    assert (
        "NVML sees 1 GPU(s) (NVIDIA H100 80GB HBM3, driver 580.159.04, CUDA 13.0), but torch" in msg
    )
    assert "is a CPU-only build" in msg
    assert "--index-url https://download.pytorch.org/whl/cu130" in msg


def test_driver_too_old_for_torch_cuda_build(pytester: pytest.Pytester, fake_nvml, site: Path):
    fake_nvml(gpus=[H100], driver="520.61.05", cuda_driver=11080)
    write_dist(site, "torch", "2.5.1+cu121")
    run = run_env(pytester, "--unsloth-checks=driver")
    assert run.failed() == {"driver"}
    assert (
        "driver 520.61.05 supports CUDA 11.8, torch 2.5.1+cu121 needs CUDA 12.1"
        in run.text["driver"]
    )
    assert "whl/cu118" in run.text["driver"]


def test_driver_minor_version_compatibility_passes_with_a_note(
    pytester: pytest.Pytester, fake_nvml, site: Path
):
    fake_nvml(gpus=[H100], driver="550.54.15", cuda_driver=12040)
    write_dist(site, "torch", "2.9.1+cu128")
    run = run_env(pytester, "--unsloth-checks=driver", "-v")
    assert run.outcomes["driver"] == "passed"
    assert "minor-version compatibility" in run.output


def test_gpu_without_bf16(pytester: pytest.Pytester, fake_nvml):
    t4 = {"name": "Tesla T4", "capability": [7, 5], "total_gib": 15.0, "free_gib": 14.6}
    fake_nvml(gpus=[t4], driver="535.104.05", cuda_driver=12020)
    run = run_env(pytester, "--unsloth-checks=bf16")
    assert run.failed() == {"bf16"}
    assert "cuda:0 (Tesla T4) sm_75 lack bf16" in run.text["bf16"]
    assert "bf16=False, fp16=True" in run.text["bf16"]


def test_gpu_without_bf16_is_fine_when_config_uses_fp16(pytester: pytest.Pytester, fake_nvml):
    t4 = {"name": "Tesla T4", "capability": [7, 5], "total_gib": 15.0, "free_gib": 14.6}
    fake_nvml(gpus=[t4], driver="535.104.05", cuda_driver=12020)
    pytester.makeini("[pytest]\nunsloth_grpo_config =\n    bf16 = False\n    fp16 = True\n")
    run = run_env(pytester, "--unsloth-checks=bf16")
    assert run.outcomes["bf16"] == "passed"


def test_low_free_vram_names_the_processes(pytester: pytest.Pytester, fake_nvml):
    l4 = {
        "name": "NVIDIA L4",
        "capability": [8, 9],
        "total_gib": 22.5,
        "free_gib": 14.7,
        "processes": [{"pid": 4242, "used_gib": 7.8}],
    }
    fake_nvml(gpus=[l4], driver="580.159.04", cuda_driver=13000)
    msg = run_env(pytester, "--unsloth-checks=vram", "--unsloth-min-free-vram=24GiB").only_failure(
        "vram"
    )
    assert "cuda:0 (NVIDIA L4) has 14.7 GiB free of 22.5 GiB, needs 24.0 GiB" in msg
    assert "pid 4242" in msg and "7.8 GiB" in msg


# ----------------------------------------------------------------------------------------------
# Kernel probes that hang, crash or fail to import (fake packages; real subprocesses)


@pytest.mark.slow
def test_hung_kernel_import_times_out_with_its_stage(
    pytester: pytest.Pytester, fake_nvml, site: Path
):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    write_dist(
        site, "bitsandbytes", "0.50.2", module="bitsandbytes", code="import time\ntime.sleep(600)\n"
    )
    run = run_env(pytester, "--unsloth-checks=bitsandbytes,vram", "--unsloth-probe-timeout=4")
    assert run.failed() == {"bitsandbytes"}
    assert run.outcomes["vram"] == "passed"  # the session went on
    assert (
        "bitsandbytes probe timed out after 4 s in stage 'import bitsandbytes'"
        in run.text["bitsandbytes"]
    )


@pytest.mark.slow
def test_segfaulting_kernel_reports_the_signal(pytester: pytest.Pytester, fake_nvml, site: Path):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    write_dist(
        site,
        "triton",
        "3.6.0",
        module="triton",
        code="import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
    )
    run = run_env(pytester, "--unsloth-checks=triton,bf16")
    assert run.failed() == {"triton"}
    assert run.outcomes["bf16"] == "passed"
    msg = run.text["triton"]
    assert "triton probe died with SIGSEGV in stage 'import triton'" in msg
    assert "Segmentation fault" in msg  # faulthandler's line from the stderr tail


@pytest.mark.slow
def test_unsloth_import_error_is_reported_verbatim(
    pytester: pytest.Pytester, fake_nvml, site: Path
):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    write_dist(
        site,
        "unsloth",
        "2026.10.9",
        module="unsloth",
        code=(
            "raise NotImplementedError("
            "'Unsloth cannot find any torch accelerator? You need a GPU.')"
        ),
    )
    run = run_env(pytester, "--unsloth-checks=unsloth")
    assert run.failed() == {"unsloth"}
    assert (
        "NotImplementedError: Unsloth cannot find any torch accelerator? You need a GPU."
        in run.text["unsloth"]
    )
    assert (
        "stage" not in run.text["unsloth"].split("\n")[0] or "import unsloth" in run.text["unsloth"]
    )


def test_required_kernel_not_installed_fails(pytester: pytest.Pytester, fake_nvml):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    run = run_env(pytester, "--unsloth-checks=xformers", "--unsloth-require=xformers")
    assert run.failed() == {"xformers"}
    assert "xformers is not installed" in run.text["xformers"]


def test_kernel_not_installed_and_not_required_skips(pytester: pytest.Pytester, fake_nvml):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    run = run_env(pytester, "--unsloth-checks=flash-attn,vllm", "-rs")
    assert run.outcomes == {"flash-attn": "skipped", "vllm": "skipped"}
    assert "flash-attn is not installed (not required)" in run.output


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="only without trl")
def test_grpo_settings_without_trl_fail_in_three_lines(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_grpo_config =\n    num_generations = 4\n")
    msg = run_env(pytester, "--unsloth-checks=grpo-config").only_failure("grpo-config")
    assert "found: ini unsloth_grpo_config in tox.ini is set, but trl is not installed" in msg
    assert "fix:   pip install trl" in msg
    assert "Traceback" not in msg
