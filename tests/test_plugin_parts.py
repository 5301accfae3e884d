"""Parts the plugin registers: --unsloth-env's only with the flag; the reporter once."""

from __future__ import annotations

import json

import pytest

ENV_PARTS = ("unsloth-builtin-checks", "unsloth-collection", "unsloth-items", "unsloth-reporter")

CONFTEST = f"""
import json

def pytest_sessionfinish(session):
    pm = session.config.pluginmanager
    names = [n for n in {ENV_PARTS!r} if pm.has_plugin(n)]
    role = "worker" if hasattr(session.config, "workerinput") else "main"
    with open(f"parts-{{role}}.jsonl", "a") as fh:
        fh.write(json.dumps(names) + "\\n")
"""


def _parts(pytester: pytest.Pytester, role: str) -> list[list[str]]:
    path = pytester.path / f"parts-{role}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plain_run_registers_no_env_part(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile("def test_ok():\n    pass\n")
    pytester.runpytest().assert_outcomes(passed=1)
    assert _parts(pytester, "main") == [[]]


def test_env_parts_with_the_flag(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    pytester.runpytest("--unsloth-env", "--unsloth-checks=python").assert_outcomes(passed=1)
    assert _parts(pytester, "main") == [list(ENV_PARTS)]


def test_reporter_on_the_xdist_controller_only(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest_subprocess(
        "--unsloth-env", "--unsloth-checks=python,pins", "-n", "2", timeout=120
    )
    result.assert_outcomes(passed=2)
    assert _parts(pytester, "main") == [list(ENV_PARTS)]
    workers = [p for p in ENV_PARTS if p != "unsloth-reporter"]
    assert _parts(pytester, "worker") == [workers, workers]
    # The workers' records still reach the controller's table.
    result.stdout.fnmatch_lines(["*unsloth environment*", "python *passed*", "pins *"])
