"""Specifier arithmetic behind the fix lines, and metadata reading."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from distfake import write_dist
from pytest_unsloth.compat.distributions import (
    Distributions,
    combined_specifier,
    format_specifier,
    obviously_empty,
    pip_install_line,
)


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        # trl 1.15 and unsloth both constrain datasets (seen on the H100 machine)
        ([">=4.7.0", "!=4.0.*,!=4.1.0,!=4.4.*,!=4.5.0,<5.0.0,>=3.4.1"], ">=4.7.0,<5.0.0"),
        (["!=0.19.0,<=1.15.0,>=0.18.2"], ">=0.18.2,!=0.19.0,<=1.15.0"),
        (["<=1.15", "<1.15"], "<1.15"),
        ([">1.0", ">=1.0"], ">1.0"),
        (["==2.9.1"], "==2.9.1"),
        (["", ">=1"], ">=1"),
    ],
)
def test_combined_specifier(specs: list[str], expected: str):
    assert format_specifier(combined_specifier(SpecifierSet(s) for s in specs)) == expected


def test_empty_ranges_are_detected():
    assert obviously_empty(combined_specifier([SpecifierSet("<1.0"), SpecifierSet(">=1.5")]))
    assert obviously_empty(SpecifierSet(">1.0,<=1.0"))
    assert not obviously_empty(SpecifierSet(">=1.0,<=1.0"))
    assert not obviously_empty(SpecifierSet("!=1.0"))


def test_pip_install_line_quotes_the_requirement():
    assert (
        pip_install_line("trl", SpecifierSet(">=0.18.2,<=1.15.0,!=0.19.0"))
        == "pip install 'trl>=0.18.2,!=0.19.0,<=1.15.0'"
    )
    assert pip_install_line("unsloth-zoo", SpecifierSet()) == "pip install 'unsloth-zoo'"


def test_inventory_reads_fake_installs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    site = tmp_path / "site"
    write_dist(
        site,
        "Unsloth_Zoo",
        "2026.10.9",
        ["torch>=2.4", 'vllm; extra == "vllm"'],
        requires_python=">=3.9",
    )
    monkeypatch.syspath_prepend(str(site))
    inv = Distributions.read(["unsloth-zoo"])
    dist = inv.get("unsloth_zoo")
    assert dist is not None
    assert (dist.name, dist.version, dist.requires_python) == ("Unsloth_Zoo", "2026.10.9", ">=3.9")
    assert dist.location == str(site)
    assert [str(r) for r in dist.requirements()] == ["torch>=2.4"]
    assert inv.get("not-installed-anywhere") is None
