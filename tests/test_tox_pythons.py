"""scripts/tox_pythons.py: tox's last env names the Pythons whose minimal env was skipped."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "tox_pythons.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tox_pythons", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH with a working python3.12 and a pyenv-like shim python3.10 that cannot run."""
    (tmp_path / "python3.12").write_text("#!/bin/sh\necho 3.12\n")
    (tmp_path / "python3.10").write_text(
        "#!/bin/sh\necho 'pyenv: python3.10: not active' >&2\nexit 127\n"
    )
    for f in tmp_path.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_missing_pythons_are_named(fake_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _load().main([]) == 0
    out = capsys.readouterr().out
    assert "Python 3.12 found on PATH" in out
    assert "Python 3.10, 3.11, 3.13 NOT FOUND" in out
    assert "minimal-py310-*, minimal-py311-*, minimal-py313-*" in out


def test_ci_fails_when_none_of_the_required_runs(
    fake_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _load()
    assert module.main(["--require-one-of=3.10,3.13"]) == 1
    assert "none of Python 3.10, 3.13 is on PATH" in capsys.readouterr().err
    assert module.main(["--require-one-of=3.10,3.12,3.13"]) == 0


def test_ci_script_and_tox_use_it() -> None:
    root = SCRIPT.parents[1]
    ci = (root / ".ci" / "run").read_text()
    assert "scripts/tox_pythons.py --require-one-of=3.10,3.12,3.13" in ci
    tox = (root / "tox.ini").read_text()
    assert "pythons" in tox.split("env_list =", 1)[1].splitlines()[0]
    # torch is installed once: no second env pins it.
    assert tox.count("torch==") == 1
