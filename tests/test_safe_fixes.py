"""Fix lines never replace torch: they pin what is installed, or move the package that disagrees.

Metadata shapes are the real ones (checked with pip's metadata-only dry run): xformers
0.0.28.post1 declares ``torch==2.4.1``; vLLM 0.11.0 declares ``torch==2.8.0``,
``torchvision==0.23.0``, ``torchaudio==2.8.0`` and a marker-guarded ``xformers==0.0.32.post1``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from distfake import write_dist
from pytest_unsloth.compat.distributions import keep_in_place, keep_pins, safe_install_line
from test_env_scenarios import run_env

XFORMERS_0_0_28 = ["numpy", "torch==2.4.1"]
VLLM_0_11 = [
    "numpy",
    "transformers>=4.55.2",
    "torch==2.8.0",
    "torchaudio==2.8.0",
    "torchvision==0.23.0",
    'xformers==0.0.32.post1; platform_system == "Linux" and platform_machine == "x86_64"',
]


def test_missing_xformers_is_installed_next_to_the_installed_torch(
    pytester: pytest.Pytester, site: Path
) -> None:
    """The H200 case: the printed line must not let pip swap torch for xformers' newest build."""
    write_dist(site, "torch", "2.11.0+cu130", ["triton==3.6.0"])
    write_dist(site, "triton", "3.6.0")
    write_dist(site, "unsloth", "2026.10.9", ["xformers>=0.0.27.post2"])
    msg = run_env(pytester, "--unsloth-checks=pins").only_failure("pins")
    assert "fix:   pip install 'xformers>=0.0.27.post2' 'torch==2.11.0' 'triton==3.6.0'" in msg
    assert "pins the installed torch==2.11.0, triton==3.6.0 so pip picks a build" in msg


def test_xformers_built_for_another_torch_moves_xformers_not_torch(
    pytester: pytest.Pytester, site: Path
) -> None:
    """xformers 0.0.28.post1 (torch==2.4.1) over torch 2.11: reinstall xformers for 2.11."""
    write_dist(site, "torch", "2.11.0+cu130")
    write_dist(site, "xformers", "0.0.28.post1", XFORMERS_0_0_28)
    msg = run_env(pytester, "--unsloth-checks=pins").only_failure("pins")
    assert "xformers 0.0.28.post1 requires torch==2.4.1; torch 2.11.0+cu130 is installed" in msg
    # Real accelerate/peft/bitsandbytes in this environment accept the installed torch.
    assert re.search(
        r"fix:   (no torch version satisfies [^;]*xformers \(==2\.4\.1\); )?move xformers first: "
        r"it disagrees with the installed torch 2\.11\.0\+cu130"
        r"(, which [a-z_, \[\]-]+ accepts?)?: pip install 'xformers' 'torch==2\.11\.0'$",
        msg,
        re.M,
    ), msg
    assert "'torch==2.4.1'" not in msg.split("fix:")[1]


def test_vllm_built_for_another_torch_keeps_torch_and_torchvision(
    pytester: pytest.Pytester, site: Path
) -> None:
    """vLLM's exact torch and torchvision pins: the fix reinstalls vLLM for what is installed."""
    write_dist(site, "torch", "2.11.0+cu130")
    write_dist(site, "torchvision", "0.26.0+cu130", ["torch==2.11.0"])
    write_dist(site, "transformers", "5.17.0")
    write_dist(site, "vllm", "0.11.0", VLLM_0_11)
    run = run_env(pytester, "--unsloth-checks=pins")
    assert run.failed() == {"pins"}
    fix = run.text["pins"].split("fix:", 1)[1]
    assert "move vllm first: it disagrees with the installed torch 2.11.0+cu130" in fix
    assert "pip install 'vllm' 'torch==2.11.0' 'torchvision==0.26.0'" in fix
    assert "'torch==2.8.0'" not in fix and "pip install 'torch" not in fix


def test_no_torch_fits_both_says_which_package_to_move_first(
    pytester: pytest.Pytester, site: Path
) -> None:
    """vLLM wants torch 2.8.0 (installed), xformers 2.4.1: xformers is the one to move."""
    write_dist(site, "torch", "2.8.0")
    write_dist(site, "transformers", "5.17.0")
    write_dist(site, "vllm", "0.11.0", [r for r in VLLM_0_11 if "xformers" not in r])
    write_dist(site, "xformers", "0.0.28.post1", XFORMERS_0_0_28)
    msg = run_env(pytester, "--unsloth-checks=pins").only_failure("pins")
    assert re.search(
        r"no torch version satisfies [^;]*vllm \(==2\.8\.0\), xformers \(==2\.4\.1\); "
        r"move xformers first: it disagrees with the installed torch 2\.8\.0, which "
        r"[a-z_, \[\]-]*vllm accepts?: pip install 'xformers' 'torch==2\.8\.0'",
        msg,
    ), msg
    # vLLM's own torchvision pin matches the installed torch, so that line may stay.
    assert "pip install 'torchvision==0.23.0' 'torch==2.8.0'" in msg


def test_known_bad_fix_lines_pin_torch_too(pytester: pytest.Pytester, site: Path) -> None:
    """A fix from the known-bad table gets the same pins."""
    write_dist(site, "torch", "2.11.0+cu130")
    write_dist(site, "transformers", "5.17.0")
    write_dist(site, "bitsandbytes", "0.45.5")
    run = run_env(pytester, "--unsloth-checks=known-bad")
    assert "fix:   pip install 'bitsandbytes>=0.46.1' 'torch==2.11.0'" in run.text["known-bad"]
    assert "pins the installed torch==2.11.0" in run.text["known-bad"]


def test_torchvision_for_another_torch_reinstalls_torchvision(
    pytester: pytest.Pytester, site: Path
) -> None:
    """torchvision declared for torch 2.9.1 over torch 2.13: torchvision moves, torch stays."""
    write_dist(site, "torch", "2.13.0+cpu")
    write_dist(site, "torchvision", "0.24.1", ["torch==2.9.1"])
    run = run_env(pytester, "--unsloth-checks=known-bad")
    fix = run.text["known-bad"].split("fix:", 1)[1]
    assert "pip install 'torchvision' 'torch==2.13.0'" in fix
    assert "torch==2.9.1" not in fix


def test_keep_pins_and_lines() -> None:
    """Installing torch itself pins nothing about torch; anything else pins it."""
    have = {"torch": "2.11.0+cu130", "Triton": "3.6.0", "trl": "1.16.0"}
    assert keep_pins(have, ["xformers"]) == ["torch==2.11.0", "triton==3.6.0"]
    assert keep_pins(have, ["torch"]) == ["triton==3.6.0"]
    assert keep_pins({}, ["xformers"]) == []
    line, note = safe_install_line([("trl", SpecifierSet("<=1.15.0,>=0.18.2"))], have)
    assert line == "pip install 'trl>=0.18.2,<=1.15.0' 'torch==2.11.0' 'triton==3.6.0'"
    assert note
    assert safe_install_line([("trl", None)], {}) == ("pip install 'trl'", "")
    assert keep_in_place("pip install 'trl>=0.14'", have)[0] == (
        "pip install 'trl>=0.14' 'torch==2.11.0' 'triton==3.6.0'"
    )
    # Commands that are not a plain install are left alone.
    assert keep_in_place("pip uninstall x", have) == ("pip uninstall x", "")
    assert keep_in_place("pip install a && pip install b", have)[1] == ""
