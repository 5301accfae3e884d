"""Per-package compatibility in the JSON report and -v, and the pip constraints writer."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from distfake import write_dist
from pytest_unsloth.compat.constraints import main, package_report
from pytest_unsloth.compat.distributions import Distributions


def _drift(site: Path) -> None:
    write_dist(site, "unsloth", "2026.10.9", ["trl!=0.19.0,<=1.15.0,>=0.18.2"])
    write_dist(site, "trl", "1.16.0")


def test_package_report_names_who_requires_what_and_the_verdict(site: Path) -> None:
    """trl 1.16.0 under unsloth's <=1.15.0: the verdict names unsloth and its range."""
    _drift(site)
    report = package_report(Distributions.read())
    trl = report["trl"]
    assert trl["version"] == "1.16.0"
    assert {
        "by": "unsloth",
        "version": "2026.10.9",
        "spec": ">=0.18.2,!=0.19.0,<=1.15.0",
        "source": "metadata",
        "ok": False,
    } in trl["required_by"]
    assert trl["verdict"] == "outside unsloth 2026.10.9 (>=0.18.2,!=0.19.0,<=1.15.0)"
    assert report["unsloth"]["verdict"] == "ok"


def test_json_report_and_verbose_table(pytester: pytest.Pytester, site: Path) -> None:
    """The JSON report gains 'compatibility'; -v prints one line per package, plain runs none."""
    _drift(site)
    result = pytester.runpytest(
        "--unsloth-env", "-p", "no:cacheprovider", "--unsloth-checks=pins", "-v",
        "--unsloth-report=r.json",
    )  # fmt: skip
    data = json.loads((pytester.path / "r.json").read_text())
    assert data["compatibility"]["trl"]["verdict"].startswith("outside unsloth 2026.10.9")
    result.stdout.fnmatch_lines(
        [
            "*unsloth packages: version, required by, verdict*",
            "trl *1.16.0 *outside unsloth 2026.10.9 (>=0.18.2,!=0.19.0,<=1.15.0)*"
            "required by unsloth >=0.18.2,!=0.19.0,<=1.15.0 (violated)*",
        ]
    )
    plain = pytester.runpytest("--unsloth-env", "-p", "no:cacheprovider", "--unsloth-checks=pins")
    assert "unsloth packages:" not in plain.stdout.str()


def test_constraints_file_pins_the_installed_stack(tmp_path: Path) -> None:
    """Every line is name==installed version; torch keeps its local build tag."""
    out = tmp_path / "constraints.txt"
    run = subprocess.run(
        [sys.executable, "-m", "pytest_unsloth.constraints", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "wrote" in run.stderr
    pins = [ln for ln in out.read_text().splitlines() if ln and not ln.startswith("#")]
    assert pins
    for line in pins:
        req = Requirement(line)
        (spec,) = list(req.specifier)
        assert spec.operator == "=="
        assert spec.version == md.version(req.name)
    if any(line.startswith("torch==") for line in pins):
        assert f"torch=={md.version('torch')}" in pins


def test_constraints_all_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--all pins every distribution (pytest too); an unwritable path is exit 2, not a crash."""
    assert main(["--all"]) == 0
    assert f"pytest=={md.version('pytest')}" in capsys.readouterr().out
    assert main(["-o", str(tmp_path / "missing-dir" / "c.txt")]) == 2
    assert "cannot write" in capsys.readouterr().err
