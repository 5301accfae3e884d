"""README.md's code runs as written: its files become a fresh project, and pytest runs there.

The convention: a fenced block preceded by ``<!-- file: PATH -->`` is the content of PATH in the
reader's project (a second block naming the same path is appended to it). Every ``python`` and
``toml`` block carries such a line, or ``<!-- not-run: REASON -->`` saying why it cannot run.
What the reader provides themselves (``models/base``, their base model's folder) the README names
next to the blocks; here the plugin's tiny offline model stands in for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clitool import pytest_script

README = Path(__file__).parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
MARKER = re.compile(r"<!-- (file|not-run): (.+?) -->\s*$")


def blocks(text: str) -> list[tuple[str, str | None, str | None, str]]:
    """(language, marker kind, marker value, body) of every fenced block."""
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARKER.search(before)
        out.append((m.group(1), mark and mark.group(1), mark and mark.group(2), m.group(2)))
    return out


def project_files(text: str) -> dict[str, str]:
    """The reader's project as README.md describes it: path -> content."""
    files: dict[str, str] = {}
    for _, kind, value, body in blocks(text):
        if kind == "file" and value:
            files[value] = files.get(value, "") + body
    return files


def test_every_python_and_toml_block_runs_or_says_why() -> None:
    unmarked = [
        body.splitlines()[0] if body else ""
        for lang, kind, _, body in blocks(README.read_text())
        if lang in ("python", "toml") and kind is None
    ]
    assert not unmarked, f"blocks without <!-- file: PATH --> or <!-- not-run: ... -->: {unmarked}"


def test_the_project_files_are_the_ones_the_readme_promises() -> None:
    files = project_files(README.read_text())
    assert set(files) >= {
        "pyproject.toml",
        "rewards.py",
        "data/train.jsonl",
        "tests/conftest.py",
        "tests/test_grpo_setup.py",
        "tests/test_grpo_steps.py",
        "tests/test_gpu.py",
        "conftest.py",
    }
    for line in files["data/train.jsonl"].splitlines():
        json.loads(line)
    # The reward functions the configuration names exist in the README's rewards.py.
    config = files["pyproject.toml"]
    for name in re.findall(r'"rewards:(\w+)"', config):
        assert f"def {name}(" in files["rewards.py"], name


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder holding the README's files plus a stand-in for ``models/base``."""
    for module in ("torch", "transformers", "trl", "peft", "bitsandbytes"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    root = tmp_path_factory.mktemp("readme-project")
    for rel, content in project_files(README.read_text()).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    # Built in a child: importing torch here could make it a second import in this process
    # (pytester's in-process runs drop modules they imported), which torch refuses.
    cache = tmp_path_factory.mktemp("tiny-models")
    code = (
        "from pytest_unsloth.models import tiny; "
        f"print(tiny.build('llama', cache_dir={str(cache)!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    built = proc.stdout.strip().splitlines()[-1]
    shutil.copytree(built, root / "models" / "base")
    return root


def _run(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = pytest_script(project.parent)
    return subprocess.run(
        [command, "-p", "no:cacheprovider", "-rs", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


@pytest.mark.slow
def test_readme_tests_pass_with_plain_pytest(project: Path) -> None:
    proc = _run(project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    # Five GRPO tests pass; without a GPU the three GPU tests take their skip path.
    if not os.environ.get("UNSLOTH_TEST_GPU"):
        assert re.search(r"\b5 passed, 3 skipped\b", summary), proc.stdout
    else:
        assert "failed" not in summary and "error" not in summary, proc.stdout


@pytest.mark.slow
def test_readme_configuration_checks_the_readme_setup(project: Path) -> None:
    proc = _run(project, "--unsloth-env", NCCL_IB_DISABLE="1")
    # No usage error: every key of the README's configuration block is valid.
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    rows = dict(re.findall(r"^(\S+)\s+(passed|FAILED|skipped|ERROR)\s", proc.stdout, re.M))
    for name in ("reward-funcs", "length-budget", "grpo-config", "dataset", "cluster-env"):
        assert rows.get(name) == "passed", (name, proc.stdout)
    assert rows.get("vram") == "skipped"  # disabled by the README's conftest.py
