"""Users and plugins add checks: decorator, hooks, veto, isolation, clashes, xdist."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from distfake import write_dist

EXAMPLE = Path(__file__).parents[1] / "examples" / "custom-checks"

CONFTEST = """
import os, time
import pytest
import pytest_unsloth
from pytest_unsloth import CheckFailed

@pytest_unsloth.check("team-pass")
def team_pass():
    return "all good here"

@pytest_unsloth.check("team-fail")
def team_fail(ctx):
    raise CheckFailed(found="NCCL_IB_DISABLE is unset", why="multi-GPU init hangs",
                      fix="export NCCL_IB_DISABLE=1")

@pytest_unsloth.check("team-skip")
def team_skip():
    pytest.skip("not a training machine")

def helper_that_breaks():
    return {}["missing-key"]

@pytest_unsloth.check("team-crash")
def team_crash():
    helper_that_breaks()

@pytest_unsloth.check("team-hang", isolated=True, timeout=3)
def team_hang():
    time.sleep(600)

@pytest_unsloth.check("team-isolated-fail", isolated=True, timeout=60)
def team_isolated_fail():
    raise CheckFailed(found="mount missing", why="data loads late", fix="mount it")

@pytest_unsloth.check("team-isolated-pass", isolated=True, timeout=60)
def team_isolated_pass(ctx):
    return f"pid {os.getpid()} probe_timeout {ctx.settings.probe_timeout}"
"""

TEAM = [
    "team-pass",
    "team-fail",
    "team-skip",
    "team-crash",
    "team-hang",
    "team-isolated-fail",
    "team-isolated-pass",
]


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    out = {}
    for rep in result.reprec.getreports("pytest_runtest_logreport"):  # type: ignore[attr-defined]
        if rep.nodeid.startswith("unsloth-env::") and (
            rep.when == "call" or rep.outcome != "passed"
        ):
            out[rep.nodeid.split("::", 1)[1]] = rep.outcome
    return out


@pytest.mark.slow
def test_conftest_checks_pass_fail_skip_crash_and_hang(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest(
        "--unsloth-env", "--unsloth-checks=" + ",".join(TEAM), "--unsloth-report=r.json"
    )
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    assert _outcomes(result) == {
        "team-pass": "passed",
        "team-fail": "failed",
        "team-skip": "skipped",
        "team-crash": "failed",
        "team-hang": "failed",
        "team-isolated-fail": "failed",
        "team-isolated-pass": "passed",
    }
    result.stdout.fnmatch_lines(
        [
            "*unsloth-env::team-fail*",
            "found: NCCL_IB_DISABLE is unset",
            "why:   multi-GPU init hangs",
            "fix:   export NCCL_IB_DISABLE=1",
        ]
    )
    # A crash shows the user's code, not the plugin's internals.
    result.stdout.fnmatch_lines(
        [
            "check 'team-crash' (conftest.py:team_crash) raised instead of passing, failing or "
            "skipping:",
            "*helper_that_breaks()*",
            "*KeyError: 'missing-key'",
        ]
    )
    crash_section = out.split("unsloth-env::team-crash")[1].split("unsloth-env::team-hang")[0]
    assert "pytest_unsloth" not in crash_section
    result.stdout.fnmatch_lines(
        ["found: isolated check timed out after 3 s in stage 'run the check'"]
    )
    data = {c["name"]: c for c in json.loads((pytester.path / "r.json").read_text())["checks"]}
    assert data["team-pass"]["message"] == "all good here"
    assert data["team-pass"]["source"] == "conftest.py:team_pass"
    assert data["team-crash"]["status"] == "error"
    assert data["team-isolated-pass"]["message"].endswith("probe_timeout 300.0")
    assert str(os.getpid()) not in data["team-isolated-pass"]["message"]


def test_custom_checks_appear_in_the_summary_beside_builtins(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=python,team-pass")
    result.stdout.fnmatch_lines(["python *passed*", "team-pass *passed *all good here"])


def test_check_from_an_installed_plugin(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    site = pytester.path / "site"
    info = write_dist(site, "pytest-ourcluster", "1.0")
    (info / "entry_points.txt").write_text("[pytest11]\nourcluster = ourcluster_checks\n")
    (site / "ourcluster_checks.py").write_text(
        textwrap.dedent("""
        import pytest
        from pytest_unsloth import Check, CheckFailed

        def dataset_mount(ctx):
            raise CheckFailed(found="/data is empty", why="no dataset", fix="mount /data")

        @pytest.hookimpl
        def pytest_unsloth_checks(config):
            return [Check("cluster-data", dataset_mount, "dataset mount", source="ourcluster")]
    """)
    )
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = pytester.runpytest_subprocess(
        "--unsloth-env", "--unsloth-checks=cluster-data", timeout=120
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*unsloth-env::cluster-data*", "found: /data is empty"])


def test_veto_hook_disables_a_builtin_with_its_reason(pytester: pytest.Pytester):
    pytester.makeconftest("""
        def pytest_unsloth_modify_checks(config, checks):
            checks.disable("vram", "the scheduler reserves VRAM")
            checks.remove("dataset")
    """)
    result = pytester.runpytest("--unsloth-env", "-rs", "--unsloth-report=r.json")
    result.stdout.fnmatch_lines(
        [
            "vram *skipped *disabled: the scheduler reserves VRAM",
            "SKIPPED [1] unsloth-env::vram: disabled: the scheduler reserves VRAM",
        ]
    )
    names = [c["name"] for c in json.loads((pytester.path / "r.json").read_text())["checks"]]
    assert "dataset" not in names and "vram" in names


def test_name_clash_with_a_builtin_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makeconftest("""
        import pytest_unsloth
        @pytest_unsloth.check("pins")
        def my_pins():
            pass
    """)
    result = pytester.runpytest("--unsloth-env")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert (
        "two checks are named 'pins': one from pytest-unsloth, one from conftest.py:my_pins" in err
    )
    assert "INTERNALERROR" not in err + result.stdout.str()


def test_name_clash_between_two_custom_checks(pytester: pytest.Pytester):
    pytester.makeconftest("""
        import pytest_unsloth
        from pytest_unsloth import Check

        @pytest_unsloth.check("team")
        def one():
            pass

        def pytest_unsloth_checks(config):
            return [Check("team", lambda ctx: None, source="our-plugin")]
    """)
    result = pytester.runpytest("--unsloth-env")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "two checks are named 'team': one from our-plugin, one from conftest.py:one"
        in result.stderr.str()
    )


def test_bad_check_name_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makeconftest("""
        import pytest_unsloth
        @pytest_unsloth.check("Team Check")
        def one():
            pass
    """)
    result = pytester.runpytest("--unsloth-env")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "check name 'Team Check' (from conftest.py:one) must be lower-case" in result.stderr.str()
    )


@pytest.mark.slow
def test_custom_checks_under_xdist_run_and_report_once(pytester: pytest.Pytester):
    pytest.importorskip("xdist")
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest_subprocess(
        "--unsloth-env",
        "-n",
        "2",
        "--unsloth-report=r.json",
        "--unsloth-checks=" + ",".join(TEAM),
        timeout=180,
    )
    result.assert_outcomes(passed=2, failed=4, skipped=1)
    data = json.loads((pytester.path / "r.json").read_text())
    assert sorted(c["name"] for c in data["checks"]) == sorted(TEAM)


@pytest.mark.slow
def test_the_readme_example_runs(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy(EXAMPLE / name, pytester.path / name)
    monkeypatch.delenv("NCCL_IB_DISABLE", raising=False)
    monkeypatch.setenv("TRAIN_DATA_DIR", str(tmp_path))
    (tmp_path / "train.jsonl").write_text("{}\n")
    monkeypatch.delenv("MODEL_DIR", raising=False)
    checks = "--unsloth-checks=cluster-env,dataset-mount,tokenizer-template,vram"
    result = pytester.runpytest("--unsloth-env", checks, "-rs")
    assert _outcomes(result) == {
        "cluster-env": "failed",
        "dataset-mount": "passed",
        "tokenizer-template": "skipped",
        "vram": "skipped",
    }
    result.stdout.fnmatch_lines(["found: NCCL_IB_DISABLE=None"])
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    result = pytester.runpytest("--unsloth-env", checks)
    assert result.ret == 0


CACHED_CONFTEST = """
import os
import pytest_unsloth

@pytest_unsloth.check("team-cached", isolated=True, timeout=60, cacheable=True)
def team_cached():
    with open(os.environ["RUN_LOG"], "a") as fh:
        fh.write("ran\\n")
    return "slow team check passed"
"""


@pytest.mark.slow
def test_cacheable_isolated_check_is_reused_until_its_source_changes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    log = pytester.path / "runs.log"
    monkeypatch.setenv("RUN_LOG", str(log))
    pytester.makeconftest(CACHED_CONFTEST)

    def run() -> pytest.RunResult:
        return pytester.runpytest_subprocess(
            "--unsloth-env", "--unsloth-checks=team-cached", "--unsloth-report=r.json", timeout=120
        )

    run().stdout.fnmatch_lines(["team-cached *passed *[[]team-cached ran in a subprocess, *"])
    result = run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["team-cached *passed *[[]team-cached from cache, * old]"])
    record = json.loads((pytester.path / "r.json").read_text())["checks"][0]
    assert record["probes"][0]["origin"] == "cache"
    assert log.read_text().count("ran") == 1
    pytester.makeconftest(CACHED_CONFTEST + "\n# edited\n")  # a changed check runs again
    run()
    assert log.read_text().count("ran") == 2
    pytester.runpytest_subprocess(
        "--unsloth-env", "--unsloth-checks=team-cached", "--unsloth-reprobe", timeout=120
    )
    assert log.read_text().count("ran") == 3


def test_custom_gpu_check_skips_without_a_gpu(pytester: pytest.Pytester, fake_nvml):
    fake_nvml(no_driver=True)
    pytester.makeconftest(
        """
        import pytest_unsloth

        @pytest_unsloth.check("team-gpu", needs_gpu=True)
        def team_gpu():
            raise AssertionError("must not run without a GPU")
        """
    )
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=team-gpu", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [1] unsloth-env::team-gpu: no NVIDIA GPU: NVML says NVML Shared Library"
            " Not Found"
        ]
    )
    result = pytester.runpytest(
        "--unsloth-env", "--unsloth-checks=team-gpu", "--unsloth-require-gpu"
    )
    result.assert_outcomes(failed=1)
