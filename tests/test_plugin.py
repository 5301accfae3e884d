"""The plugin as a user meets it: items, options, exit codes, reports, import cost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "vllm", "datasets")


def _modules_after(pytester: pytest.Pytester, *args: str) -> set[str]:
    """Run pytest in a fresh interpreter and return the heavy modules it imported."""
    pytester.makeconftest(
        textwrap.dedent(f"""
        import sys
        def pytest_unconfigure(config):
            heavy = [m for m in {HEAVY!r} if m in sys.modules]
            with open("modules.json", "w") as fh:
                import json
                json.dump(heavy, fh)
    """)
    )
    result = pytester.runpytest_subprocess(*args, timeout=120)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    return set(json.loads((pytester.path / "modules.json").read_text()))


def test_plain_run_imports_nothing_heavy(pytester: pytest.Pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    assert _modules_after(pytester) == set()


def test_env_run_without_gpu_imports_nothing_heavy(pytester: pytest.Pytester):
    assert _modules_after(pytester, "--unsloth-env") == set()


def test_entry_point_module_imports_only_stdlib_and_pytest():
    code = textwrap.dedent("""
        import sys, time
        import pytest
        before = set(sys.modules)
        t = time.perf_counter()
        import pytest_unsloth.plugin
        dt = time.perf_counter() - t
        new = sorted(m for m in set(sys.modules) - before
                     if not m.startswith("pytest_unsloth"))
        print(dt, new)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    _, new = out.stdout.split(" ", 1)
    stdlib = set(sys.stdlib_module_names)
    third_party = [m for m in eval(new) if m.split(".")[0] not in stdlib]
    assert third_party == []


def test_no_items_without_the_flag(pytester: pytest.Pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest("--co", "-q")
    assert "unsloth-env" not in result.stdout.str()
    result.assert_outcomes()


def test_disabled_with_p_no_unsloth(pytester: pytest.Pytester):
    result = pytester.runpytest("-p", "no:unsloth", "--unsloth-env")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unrecognized arguments: --unsloth-env" in result.stderr.str()


def test_items_have_the_unsloth_env_prefix(pytester: pytest.Pytester):
    result = pytester.runpytest("--unsloth-env", "--co", "-q")
    lines = result.stdout.lines
    for name in (
        "python",
        "packages",
        "pins",
        "known-bad",
        "user-pins",
        "cuda",
        "driver",
        "arch",
        "bf16",
        "vram",
        "bitsandbytes",
        "triton",
        "flash-attn",
        "xformers",
        "unsloth",
        "vllm",
        "reward-funcs",
        "length-budget",
        "grpo-config",
        "dataset",
        "fit",
    ):
        assert f"unsloth-env::{name}" in lines


def test_env_only_mode_does_not_collect_user_tests(pytester: pytest.Pytester):
    pytester.makepyfile(test_user="raise RuntimeError('must not be imported')\n")
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=python")
    result.assert_outcomes(passed=1)


def test_env_with_explicit_paths_runs_both(pytester: pytest.Pytester):
    pytester.makepyfile(test_user="def test_a():\n    pass\n")
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=python", "test_user.py")
    result.assert_outcomes(passed=2)


def test_k_selects_checks(pytester: pytest.Pytester):
    from pytest_unsloth.checks.builtin import builtin_checks

    result = pytester.runpytest("--unsloth-env", "-k", "known-bad or python")
    result.assert_outcomes(passed=2, deselected=len(builtin_checks()) - 2)


def test_selection_leaves_checks_out(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_checks = -cuda -driver\n")
    result = pytester.runpytest("--unsloth-env", "--co", "-q")
    assert "unsloth-env::cuda" not in result.stdout.lines
    assert "unsloth-env::python" in result.stdout.lines


def test_unknown_check_in_selection_is_a_usage_error(pytester: pytest.Pytester):
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=pythn")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--unsloth-checks names unknown check(s) 'pythn'" in err
    assert "python, packages" in err
    assert "INTERNALERROR" not in err + result.stdout.str()


def test_exit_code_is_one_when_a_check_fails(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_require = no-such-package-xyz\n")
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=packages")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "*unsloth-env::packages*",
            "found: required but not installed: no-such-package-xyz",
            "why:   ini unsloth_require in tox.ini says the project needs them",
            # With torch installed the line also pins it (pip must not replace it).
            "fix:   pip install no-such-package-xyz*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_last_failed_reruns_the_failed_check(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_require = no-such-package-xyz\n")
    pytester.runpytest("--unsloth-env")
    result = pytester.runpytest("--unsloth-env", "--lf")
    from pytest_unsloth.checks.builtin import builtin_checks

    result.assert_outcomes(failed=1, deselected=len(builtin_checks()) - 1)


def test_xdist_runs_every_check_once(pytester: pytest.Pytester):
    pytest.importorskip("xdist")
    result = pytester.runpytest_subprocess(
        "--unsloth-env", "-n", "2", "--unsloth-report=r.json", timeout=120
    )
    from pytest_unsloth.checks.builtin import builtin_checks

    n = len(builtin_checks())
    # The machine checks (shm, disk, platform) pass or skip depending on the host.
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 4 and outcomes["passed"] + outcomes["skipped"] == n, outcomes
    data = json.loads((pytester.path / "r.json").read_text())
    assert [c["name"] for c in data["checks"]][:3] == ["python", "packages", "pins"]
    assert len(data["checks"]) == n


def test_json_report_schema(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_require = no-such-package-xyz\n")
    pytester.runpytest("--unsloth-env", "--unsloth-report", "out/report.json")
    data = json.loads((pytester.path / "out" / "report.json").read_text())
    assert data["schema"] == "pytest-unsloth/1"
    assert data["exitstatus"] == 1
    assert set(data) >= {
        "plugin_version",
        "created",
        "python",
        "platform",
        "packages",
        "nvml",
        "summary",
        "checks",
    }
    by_name = {c["name"]: c for c in data["checks"]}
    pkg = by_name["packages"]
    assert pkg["status"] == "failed"
    assert pkg["fix"].startswith("pip install no-such-package-xyz")
    assert pkg["found"].startswith("required but not installed")
    assert isinstance(pkg["duration"], float)
    assert by_name["cuda"]["status"] == "skipped"
    assert data["nvml"]["available"] is False


def test_junit_gets_check_properties(pytester: pytest.Pytester):
    pytester.runpytest("--unsloth-env", "--unsloth-checks=python", "--junitxml=j.xml")
    xml = (pytester.path / "j.xml").read_text()
    assert 'classname="unsloth-env" name="python"' in xml
    assert '<property name="unsloth_check"' in xml


def test_terminal_summary_table(pytester: pytest.Pytester):
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=python,cuda")
    result.stdout.fnmatch_lines(
        [
            "*= unsloth environment =*",
            "python *passed *Python *",
            "cuda *skipped *no NVIDIA GPU*",
        ]
    )


def test_github_step_summary(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.runpytest("--unsloth-env", "--unsloth-checks=python,cuda")
    text = summary.read_text()
    assert "| `python` | ✅ passed |" in text
    assert "| `cuda` | ⏭️ skipped |" in text


def test_header_line_only_with_env_or_verbose(pytester: pytest.Pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    assert "unsloth:" not in pytester.runpytest().stdout.str()
    pytester.runpytest("-v").stdout.fnmatch_lines(["unsloth: *torch*"])


def test_unwritable_report_path_is_reported_not_crashed(pytester: pytest.Pytester):
    blocker = pytester.path / "file"
    blocker.write_text("")
    result = pytester.runpytest(
        "--unsloth-env", "--unsloth-checks=python", f"--unsloth-report={blocker}/r.json"
    )
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["unsloth: cannot write the JSON report to */r.json (--unsloth-report): *"]
    )
    assert "INTERNALERROR" not in result.stdout.str()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is not None, reason="only without torch"
)
def test_model_fixtures_without_the_stack_fail_in_one_line(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        def test_a(loaded_4bit_model):
            pass

        def test_c(grpo_trainer):
            grpo_trainer(reward_funcs=[])
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "the loaded_4bit_model fixture needs torch, transformers, bitsandbytes, which are not "
            "installed here. Fix: pip install torch transformers bitsandbytes",
            "grpo_trainer needs torch, transformers, trl, datasets, which are not installed here.*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
