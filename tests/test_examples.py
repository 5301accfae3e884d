"""Every example under examples/ runs here, so none can rot."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clitool import pytest_script

EXAMPLES = Path(__file__).parents[1] / "examples"

pytestmark = pytest.mark.slow


def _copy(name: str, dest: Path) -> Path:
    target = dest / Path(name).name
    shutil.copytree(
        EXAMPLES / name, target, ignore=shutil.ignore_patterns("models", ".pytest_cache")
    )
    if (target / "make_tiny_model.py").exists():
        subprocess.run(
            [sys.executable, "make_tiny_model.py"],
            cwd=target,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return target


@pytest.fixture(scope="module")
def pytest_command(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The plain ``pytest`` command the READMEs give (not ``python -m pytest``)."""
    return pytest_script(tmp_path_factory.mktemp("bin"))


def _run(pytest_command: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pytest --unsloth-env`` in ``folder``, as the examples' READMEs say."""
    return subprocess.run(
        [pytest_command, "--unsloth-env", "-p", "no:cacheprovider", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _table(stdout: str) -> dict[str, str]:
    section = stdout.split("= unsloth environment =", 1)[1]
    rows = {}
    for line in section.splitlines()[1:]:
        m = re.match(r"^(\S+)\s+(passed|FAILED|skipped|ERROR)\s", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_ci_gate_passes_every_configured_check(tmp_path: Path, pytest_command: str):
    pytest.importorskip("trl")
    folder = _copy("ci-gate", tmp_path)
    proc = _run(pytest_command, folder, "--unsloth-report=report.json")
    assert proc.returncode == 0, proc.stdout
    rows = _table(proc.stdout)
    for name in (
        "python",
        "packages",
        "pins",
        "known-bad",
        "user-pins",
        "reward-funcs",
        "length-budget",
        "grpo-config",
        "dataset",
    ):
        assert rows[name] == "passed", (name, proc.stdout)
    assert (folder / "report.json").exists()
    workflow = (folder / ".github" / "workflows" / "unsloth-env.yml").read_text()
    assert "pytest --unsloth-env" in workflow and "upload-artifact" in workflow
    # Every file the workflow installs from exists, and pytest-unsloth (not on PyPI) comes from Git.
    for match in re.findall(r"-r\s+(\S+)", workflow):
        assert (folder / match).is_file(), match
    assert '"pytest-unsloth @ git+https://github.com/OWNER/pytest-unsloth"' in workflow


@pytest.mark.parametrize(
    ("name", "check"),
    [("pin-drift", "pins"), ("bad-reward", "reward-funcs"), ("overlong-prompt", "length-budget")],
)
def test_broken_env_examples_fail_as_documented(
    tmp_path: Path, pytest_command: str, name: str, check: str
):
    if name != "pin-drift":
        pytest.importorskip("trl")
    folder = _copy(f"broken-env/{name}", tmp_path)
    proc = _run(pytest_command, folder)
    assert proc.returncode == 1, proc.stdout
    assert _table(proc.stdout) == {check: "FAILED"}
    expected = (folder / "EXPECTED.md").read_text()
    found = next(line for line in expected.splitlines() if line.startswith("found:"))
    actual = proc.stdout.replace(f"{folder}/", "<example>/")
    assert found in actual.splitlines(), actual
    fix = next(line for line in expected.splitlines() if line.startswith("fix:"))
    # Install lines pin the installed torch/torchvision/triton (issue 14): versions vary by host.
    actual, pins = re.subn(r"( '(torch|torchvision|triton)==[^']+')+", " <keep-pins>", actual)
    if not pins:
        fix = fix.replace(" <keep-pins>", "")
    assert fix in actual.splitlines()


def test_grpo_tests_example_runs_on_the_tiny_default(tmp_path: Path, pytest_command: str):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    folder = _copy("grpo-tests", tmp_path)
    # Plain `pytest`, as its README says: rewards.py must be importable without `python -m`.
    proc = subprocess.run(
        [pytest_command, "-rs", "-p", "no:cacheprovider"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout
    assert "4 passed, 2 skipped" in proc.stdout
    # Without a GPU the GPU tests skip with the reason, never run.
    assert "test_training.py:" in proc.stdout and "needs an NVIDIA GPU" in proc.stdout
    assert "transformers backend" in proc.stdout


def test_every_example_has_a_readme_giving_its_command():
    for folder in sorted(p for p in EXAMPLES.iterdir() if p.is_dir()):
        readme = folder / "README.md"
        assert readme.is_file(), f"{folder.name} has no README.md"
        assert "pytest" in readme.read_text(), folder.name


def test_custom_checks_example_runs_as_its_readme_says(
    tmp_path: Path, pytest_command: str, monkeypatch: pytest.MonkeyPatch
):
    readme = (EXAMPLES / "custom-checks" / "README.md").read_text()
    assert "pytest --unsloth-env" in readme and "NCCL_IB_DISABLE=1 pytest --unsloth-env" in readme
    folder = _copy("custom-checks", tmp_path)
    for name in ("NCCL_IB_DISABLE", "TRAIN_DATA_DIR", "MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    proc = _run(pytest_command, folder)
    assert proc.returncode == 1, proc.stdout
    rows = _table(proc.stdout)
    assert rows["cluster-env"] == "FAILED"
    assert rows["dataset-mount"] == rows["tokenizer-template"] == rows["vram"] == "skipped"
    assert "fix:   export NCCL_IB_DISABLE=1 (it is in our job template)" in proc.stdout
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    proc = _run(pytest_command, folder)
    assert proc.returncode == 0, proc.stdout
    assert _table(proc.stdout)["cluster-env"] == "passed"
