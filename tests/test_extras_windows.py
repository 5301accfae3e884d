"""Extras whose packages are installed are enforced; TRL's vLLM window is read from its source.

The fake trl carries the real installed ``trl/import_utils.py`` (so the window is read from the
source shape TRL really ships) and trl 1.16.0's real ``vllm`` extra lines.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import shutil
from pathlib import Path

import pytest

from distfake import write_dist
from pytest_unsloth.compat.distributions import Dist, active_extras
from pytest_unsloth.compat.windows import find_window, read_windows
from test_env_scenarios import run_env

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="the fix line pins the installed torch: there is none in the minimal env",
)


TRL_VLLM_EXTRA = [
    'vllm<=0.31.0,>=0.22.0; extra == "vllm"',
    'aiohttp>=3.13.3; extra == "vllm"',
    'requests; extra == "vllm"',
]


def _real_trl_import_utils() -> Path:
    try:
        return Path(str(md.distribution("trl").locate_file("trl/import_utils.py")))
    except md.PackageNotFoundError:
        pytest.skip("trl is not installed")


def test_active_extras_need_every_package_of_the_extra() -> None:
    """An extra counts only when all its packages are installed; dev/test extras never do."""
    dist = Dist(
        "trl",
        "1.16.0",
        "",
        (*TRL_VLLM_EXTRA, 'pytest; extra == "test"', 'peft>=0.13.0; extra == "peft"'),
    )
    installed = {"vllm", "aiohttp", "requests", "pytest", "peft"}
    got = [(str(r), e) for r, e in active_extras(dist, lambda n: n in installed)]
    assert ('vllm<=0.31.0,>=0.22.0; extra == "vllm"', "vllm") in got
    assert ('peft>=0.13.0; extra == "peft"', "peft") in got
    assert all(e != "test" for _, e in got)
    without_aiohttp = active_extras(dist, lambda n: n in installed - {"aiohttp"})
    assert all(e != "vllm" for _, e in without_aiohttp)


@needs_torch
def test_trl_vllm_extra_is_enforced_when_vllm_is_installed(
    pytester: pytest.Pytester, site: Path
) -> None:
    """vLLM 0.11 next to trl 1.16 breaks the trl[vllm] range: pins says so, naming the extra."""
    write_dist(site, "trl", "1.16.0", TRL_VLLM_EXTRA)
    write_dist(site, "vllm", "0.11.0")
    write_dist(site, "aiohttp", "3.13.3")
    write_dist(site, "requests", "2.32.5")
    msg = run_env(pytester, "--unsloth-checks=pins").only_failure("pins")
    assert "trl[vllm] 1.16.0 requires vllm>=0.22.0,<=0.31.0; vllm 0.11.0 is installed" in msg
    assert "pip install 'vllm>=0.22.0,<=0.31.0' 'torch==" in msg


def test_extra_is_ignored_when_its_packages_are_missing(
    pytester: pytest.Pytester, site: Path
) -> None:
    """Without the extra's aiohttp the same vLLM is not judged by the extra."""
    write_dist(site, "trl", "1.16.0", [*TRL_VLLM_EXTRA, 'zzz-not-installed; extra == "vllm"'])
    write_dist(site, "vllm", "0.11.0")
    run = run_env(pytester, "--unsloth-checks=pins")
    assert "trl[vllm]" not in run.text.get("pins", "")


def test_window_is_read_from_the_real_trl_source() -> None:
    """The installed TRL's is_vllm_available window, with its line."""
    source = _real_trl_import_utils().read_text()
    found = find_window(source, "is_vllm_available")
    assert found is not None
    low, high, line, text = found
    assert f'Version("{low}")' in text and f'Version("{high}")' in text
    assert source.splitlines()[line - 1].strip() == text
    assert [w.target for w in read_windows()] == ["vllm"]


def test_vllm_outside_trls_window_fails_with_the_source_line(
    pytester: pytest.Pytester, site: Path
) -> None:
    """A vLLM outside the window fails `windows` with file:line and a torch-keeping fix."""
    real = _real_trl_import_utils()
    window = find_window(real.read_text(), "is_vllm_available")
    assert window is not None
    folder = write_dist(site, "trl", "1.16.0", module="trl")
    shutil.copy(real, site / "trl" / "import_utils.py")
    (folder / "RECORD").write_text("trl/__init__.py,,\ntrl/import_utils.py,,\n")
    write_dist(site, "torch", "2.11.0+cu130")
    write_dist(site, "vllm", "0.11.0")
    msg = run_env(pytester, "--unsloth-checks=windows").only_failure("windows")
    low, high, line, _ = window
    assert f"vllm 0.11.0 is outside the vllm versions trl 1.16.0 supports ({low} to {high})" in msg
    assert f"import_utils.py:{line}: `if not (Version(" in msg
    assert f"pip install 'vllm>={low},<={high}' 'torch==2.11.0'" in msg


def test_vllm_inside_the_window_passes(pytester: pytest.Pytester, site: Path) -> None:
    """A vLLM at the window's lower bound (with a local label) passes."""
    real = _real_trl_import_utils()
    window = find_window(real.read_text(), "is_vllm_available")
    assert window is not None
    folder = write_dist(site, "trl", "1.16.0", module="trl")
    shutil.copy(real, site / "trl" / "import_utils.py")
    (folder / "RECORD").write_text("")
    write_dist(site, "vllm", f"{window[0]}+cu129")
    run = run_env(pytester, "--unsloth-checks=windows")
    assert run.outcomes == {"windows": "passed"}


@pytest.mark.parametrize(
    "source",
    [
        "def is_vllm_available():\n    return True\n",
        "def other():\n    Version('1') <= v <= Version('2')\n",
        "",
    ],
)
def test_no_window_found_in_other_shapes(source: str) -> None:
    """A refactored function without a literal window yields nothing (never a guess)."""
    assert find_window(source, "is_vllm_available") is None
