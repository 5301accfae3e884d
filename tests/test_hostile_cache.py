"""The cache and the disk never turn a working kernel into a failure.

A probe cache that cannot be used (folder not creatable, lock not openable, entry damaged) costs
one warning and a fresh probe, never a failed check. Each run is a real pytest subprocess against
a fake GPU and a fake ``vllm`` that logs every probe (see ``test_probe_cache.Env``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from test_probe_cache import Env

pytestmark = pytest.mark.slow

UNUSABLE = "pytest-unsloth: the probe cache cannot be used"
DROPPED = "pytest-unsloth: dropped a damaged probe-cache entry for 'vllm'"


@pytest.fixture
def env(pytester: pytest.Pytester, fake_nvml, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(pytester, fake_nvml, monkeypatch)


def _run(env: Env, *args: str) -> tuple[pytest.RunResult, str]:
    start = time.monotonic()
    result = env.run("-W", "always::pytest.PytestCacheWarning", *args)
    assert time.monotonic() - start < 120
    out = result.stdout.str()
    assert "probe runner error" not in out and "reinstall" not in out
    result.assert_outcomes(passed=1)  # the real (passing) probe result is reported
    return result, out


def _entry(env: Env) -> Path:
    return env.pytester.path / ".pytest_cache" / "d" / "unsloth-probes" / "vllm.json"


def _warning_lines(out: str, text: str) -> list[str]:
    return [ln for ln in out.splitlines() if text in ln]


def _assert_one_unusable_warning(out: str, why: str) -> None:
    lines = _warning_lines(out, UNUSABLE)
    assert len(lines) == 1, out
    assert why in lines[0], lines[0]
    assert lines[0].endswith(
        "probes run uncached this session. Fix: make the cache_dir writable, or run with "
        "-p no:cacheprovider"
    )


def test_pytest_cache_is_a_file(env: Env):
    (env.pytester.path / ".pytest_cache").write_text("not a folder")
    _, out = _run(env)
    _assert_one_unusable_warning(out, "cannot take the probe lock: cannot create the cache folder")
    _, out = _run(env)
    assert env.probes == 2  # nothing was (or could be) cached


def test_cache_dir_whose_parent_is_a_file(env: Env):
    (env.pytester.path / "blocker").write_text("")
    env.pytester.makeini("[pytest]\ncache_dir = blocker/cache\n")
    _, out = _run(env)
    _assert_one_unusable_warning(out, "cannot create the cache folder 'unsloth-locks'")
    assert env.probes == 1


def test_cache_d_folder_is_a_file(env: Env):
    env.run()  # creates .pytest_cache
    d = env.pytester.path / ".pytest_cache" / "d"
    for child in d.rglob("*"):
        if child.is_file():
            child.unlink()
    for child in sorted(d.rglob("*"), reverse=True):
        child.rmdir()
    d.rmdir()
    d.write_text("")
    _, out = _run(env)
    _assert_one_unusable_warning(out, "Not a directory")
    assert env.probes == 2


def test_lock_file_that_is_a_directory(env: Env):
    (env.pytester.path / ".pytest_cache" / "d" / "unsloth-locks" / "vllm.lock").mkdir(parents=True)
    _, out = _run(env)
    _assert_one_unusable_warning(out, "cannot take the probe lock: [Errno 21] Is a directory")
    assert env.probes == 1


def test_entry_path_that_is_a_directory(env: Env):
    _entry(env).mkdir(parents=True)
    _, out = _run(env)
    _assert_one_unusable_warning(out, "cannot read the probe cache: [Errno 21] Is a directory")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "not valid"),
        (lambda text: "[1, 2, 3]", "not a JSON object but list"),
        (lambda text: json.dumps({**json.loads(text), "schema": 1}), "schema 1, expected 2"),
        (
            lambda text: json.dumps({**json.loads(text), "time": "yesterday"}),
            "wrong type or value of time",
        ),
        (
            lambda text: json.dumps(
                {**json.loads(text), "result": {"status": "passed", "message": 7}}
            ),
            "wrong type or value of result.message",
        ),
        (
            lambda text: json.dumps({**json.loads(text), "result": ["passed"]}),
            "wrong type or value of result",
        ),
    ],
    ids=["truncated", "not-utf8", "list", "old-schema", "time-str", "message-int", "result-list"],
)
def test_damaged_entry_is_dropped_and_rewritten(env: Env, damage, problem: str):
    env.run()
    entry = _entry(env)
    entry.write_text(damage(entry.read_text()), encoding="latin-1")
    _, out = _run(env)
    lines = _warning_lines(out, DROPPED)
    assert len(lines) == 1, out
    assert f"({problem}" in lines[0]
    assert lines[0].endswith("probed again and rewritten")
    assert env.probes == 2
    rewritten = json.loads(entry.read_text())
    assert rewritten["schema"] == 2 and rewritten["result"]["status"] == "passed"
    _, out = _run(env)  # and the rewritten entry is used again, without a warning
    assert env.probes == 2 and DROPPED not in out
