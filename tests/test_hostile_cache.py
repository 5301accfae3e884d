"""The cache and the disk never turn a working kernel into a failure.

A probe cache that cannot be used (folder not creatable, lock not openable, entry damaged) costs
one warning and a fresh probe, never a failed check. Each run is a real pytest subprocess against
a fake GPU and a fake ``vllm`` that logs every probe (see ``test_probe_cache.Env``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from test_probe_cache import Env

needs_hub = pytest.mark.skipif(
    importlib.util.find_spec("huggingface_hub") is None,
    reason="needs huggingface_hub (the ML stack; not the minimal env)",
)


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


# ----------------------------------------------------------------------------------------------
# No network from the pytest process: our own Hub calls stay offline even when the user's
# environment does not say so (huggingface_hub read HF_HUB_OFFLINE at import).


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Make every name lookup and connection raise (and record it); the user is 'online'."""
    import socket

    import huggingface_hub.constants

    attempts: list[tuple[object, ...]] = []

    def refuse(*args: object, **kwargs: object) -> object:
        attempts.append(args[:2])
        raise OSError("network access in a test that must stay offline")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


@needs_hub
def test_hub_offline_stops_the_lookup_and_restores_the_users_setting(no_network):
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    from pytest_unsloth.util.offline import hub_offline

    # (Whether the bare call looks up huggingface.co depends on what earlier tests in this
    # process loaded; test_length_budget_... below has the end-to-end control.)
    with hub_offline(), pytest.raises(OSError):
        AutoTokenizer.from_pretrained("someorg/no-such-tokenizer", local_files_only=True)
    assert no_network == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ
    with hub_offline(allow_download=True):
        assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # allowed: nothing changes


@needs_hub
def test_length_budget_reports_a_missing_tokenizer_without_a_lookup(
    pytester: pytest.Pytester, no_network
):
    import huggingface_hub.constants

    (pytester.path / "train.jsonl").write_text(
        json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    pytester.makeini(
        "[pytest]\nunsloth_dataset = train.jsonl\nunsloth_tokenizer = no-such-tokenizer-folder\n"
    )
    start = time.monotonic()
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=length-budget")
    assert time.monotonic() - start < 60
    result.assert_outcomes(failed=1)
    # The check runs in a child with the offline variables set; the folder is named as missing.
    result.stdout.fnmatch_lines(["found: *'no-such-tokenizer-folder': no such folder (*"])
    assert no_network == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # the user's setting is back


@needs_hub
def test_model_fixture_path_reports_a_missing_hub_model_without_a_lookup(no_network):
    from pytest_unsloth.models.loader import ModelLoadError, ModelRequest, load_4bit

    with pytest.raises(
        ModelLoadError, match="nor in the Hugging Face cache, and downloads are off"
    ):
        load_4bit(ModelRequest("someorg/no-such-model"))
    assert no_network == []


# ----------------------------------------------------------------------------------------------
# Nothing left behind in the temp folder: torch's import-time caches of our calls go to pytest's
# cache folder, and the xdist run folder is removed by the controller.


def test_grpo_config_and_model_fixtures_leave_the_temp_dir_empty(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    pytester.makeini(
        "[pytest]\nunsloth_grpo_config =\n    num_generations = 2\n"
        "    per_device_train_batch_size = 2\n"
    )
    pytester.makepyfile(
        """
        import os

        def test_lora(peft_model):
            assert peft_model is not None
            # our calls' cache locations are not the user's: the variables are unset again
            assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
        """
    )
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        "--unsloth-env", "--unsloth-checks=grpo-config", ".", timeout=300
    )
    assert time.monotonic() - start < 300
    assert "INTERNALERROR" not in result.stdout.str()
    result.assert_outcomes(passed=2)
    assert sorted(p.name for p in temp.iterdir()) == []
    caches = pytester.path / ".pytest_cache" / "d" / "unsloth-torch-caches"
    assert (caches / "torchinductor").is_dir()


def test_xdist_run_folder_is_removed_at_the_end(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    pytest.importorskip("xdist")
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    env.pytester.makepyfile("def test_a(): pass\ndef test_b(): pass\n")
    result = env.run("-n", "2", "-p", "no:randomly", ".")
    result.assert_outcomes(passed=3)
    assert env.probes == 1
    assert sorted(p.name for p in temp.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Isolated checks in nested conftest.py files: the child runs the function of THAT file, even
# though every conftest module is named "conftest".

NESTED = """
import pytest_unsloth

@pytest_unsloth.check("{name}", isolated=True, timeout=60)
def team_check():
    return "ran {name} from " + __file__
"""


def test_isolated_checks_in_nested_conftests_run_their_own_function(pytester: pytest.Pytester):
    pytester.makeconftest(NESTED.format(name="root-check"))
    for folder in ("alpha", "beta"):
        (pytester.path / folder).mkdir()
        (pytester.path / folder / "conftest.py").write_text(NESTED.format(name=f"{folder}-check"))
        (pytester.path / folder / f"test_{folder}.py").write_text("def test_ok(): pass\n")
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        "--unsloth-env",
        "--unsloth-checks=root-check,alpha-check,beta-check",
        "--unsloth-report=r.json",
        "alpha",
        "beta",
        timeout=120,
    )
    assert time.monotonic() - start < 120
    assert "INTERNALERROR" not in result.stdout.str()
    result.assert_outcomes(passed=5)
    report = json.loads((pytester.path / "r.json").read_text())
    messages = {c["name"]: c["message"] for c in report["checks"]}
    assert messages == {
        name: f"ran {name} from {pytester.path / folder / 'conftest.py'}"
        for name, folder in (("root-check", ""), ("alpha-check", "alpha"), ("beta-check", "beta"))
    }


CACHED = """
import pytest_unsloth

@pytest_unsloth.check("team-cached", isolated=True, timeout=60, cacheable=True)
def team_cached():
    with open("runs.log", "a") as fh:
        fh.write("ran\\n")
    return "cached check ok"
"""


def test_cacheable_isolated_check_with_a_damaged_entry(pytester: pytest.Pytester):
    pytester.makeconftest(CACHED)

    def run() -> str:
        result = pytester.runpytest_subprocess(
            "--unsloth-env", "--unsloth-checks=team-cached", timeout=120
        )
        assert "INTERNALERROR" not in result.stdout.str()
        result.assert_outcomes(passed=1)
        return result.stdout.str()

    run()
    (entry,) = (pytester.path / ".pytest_cache" / "d" / "unsloth-probes").glob("check-team-*")
    entry.write_text('{"schema": 2, "fingerprint": ')
    out = run()
    lines = _warning_lines(out, "pytest-unsloth: dropped a damaged probe-cache entry for 'check-")
    assert len(lines) == 1 and "not valid JSON" in lines[0], out
    run()
    assert (pytester.path / "runs.log").read_text() == "ran\nran\n"  # rewritten, then reused
