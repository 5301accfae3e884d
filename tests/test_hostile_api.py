"""The custom-check API used wrongly: a usage error naming the check or hook, the file and the
fix, or a clear error of that one check while the rest of the session runs. Never INTERNALERROR.
"""

from __future__ import annotations

import json
import types
from typing import Any

import pytest

import pytest_unsloth
from pytest_unsloth.checks.base import Check
from pytest_unsloth.checks.registry import ATTR, CheckList, _contributed, decorated_checks
from subrun import output

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ONE_CHECK = ("--unsloth-env", "--unsloth-checks=python")


def _run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, str]:
    result = pytester.runpytest(*args)
    return result, output(result)


def _clean(out: str) -> None:
    assert "INTERNALERROR" not in out
    assert "Traceback" not in out


# ----------------------------------------------------------------------------------------------
# Usage errors at gathering: (conftest source, pieces of the message)

USAGE: list[tuple[str, tuple[str, ...]]] = [
    (
        "import pytest_unsloth\n@pytest_unsloth.check(404)\ndef team():\n    pass\n",
        ("check name 404", "is int, not a string", "conftest.py:team", "Fix:"),
    ),
    (
        "import pytest_unsloth\n@pytest_unsloth.check\ndef team():\n    pass\n",
        ("conftest.py:team", "without a name", "@pytest_unsloth.check('my-check')"),
    ),
    (
        "import pytest_unsloth\nthing = pytest_unsloth.check('team')(42)\n",
        ("conftest.py:int", "42 is not callable", "a check is a function"),
    ),
    (
        "import pytest_unsloth\n@pytest_unsloth.check('team')\nclass Team:\n    pass\n",
        ("conftest.py:Team", "Team is a class", "decorate a function"),
    ),
    (
        "import pytest_unsloth\nteam = pytest_unsloth.check('team')(lambda a, b: None)\n",
        ("conftest.py:<lambda>", "takes (a, b)", "no argument or one (the CheckContext)"),
    ),
    (
        "import pytest_unsloth\n@pytest_unsloth.check('team', timeout=-1)\ndef team():\n    pass\n",
        ("check 'team'", "timeout=-1", "number of seconds", "conftest.py:team"),
    ),
    (
        "import pytest_unsloth\n@pytest_unsloth.check('Team Check')\ndef team():\n    pass\n",
        ("'Team Check'", "lower-case letters", "conftest.py:team"),
    ),
    (
        "import pytest_unsloth\ndef pytest_unsloth_checks(config):\n"
        "    return pytest_unsloth.Check('team', lambda ctx: None)\n",
        ("pytest_unsloth_checks in conftest.py", "returned one Check ('team')", "return [check]"),
    ),
    (
        "import pytest_unsloth\ndef pytest_unsloth_checks(config):\n"
        "    return [pytest_unsloth.Check('team', lambda ctx: None), 'cuda']\n",
        ("pytest_unsloth_checks in conftest.py", "item 1 is str 'cuda'", "Check objects only"),
    ),
    (
        "def pytest_unsloth_checks(config):\n    return 'team'\n",
        ("pytest_unsloth_checks in conftest.py", "returned str 'team'", "list of"),
    ),
    (
        "def pytest_unsloth_checks(config):\n    raise RuntimeError('no disk')\n",
        ("pytest_unsloth_checks in conftest.py raised RuntimeError: no disk", "Fix:"),
    ),
    (
        "import pytest_unsloth\ndef pytest_unsloth_checks(config):\n"
        "    return [pytest_unsloth.Check('team', lambda ctx: None, timeout=float('nan'))]\n",
        ("pytest_unsloth_checks in conftest.py raised ValueError", "timeout=nan"),
    ),
    (
        "def pytest_unsloth_modify_checks(config, checks):\n    checks.disable('pyhton', 'x')\n",
        (
            "pytest_unsloth_modify_checks in conftest.py",
            "checks.disable('pyhton')",
            "did you mean 'python'?",
        ),
    ),
    (
        "def pytest_unsloth_modify_checks(config, checks):\n    checks.disable('python', 5)\n",
        ("checks.disable('python', 5)", "reason must be a non-empty string", "conftest.py"),
    ),
    (
        "def pytest_unsloth_modify_checks(config, checks):\n    checks.remove(3)\n",
        ("checks.remove(3)", "must be a check name", "conftest.py"),
    ),
    (
        "def pytest_unsloth_modify_checks(config, checks):\n    checks.replace('python')\n",
        ("checks.replace('python')", "expected a pytest_unsloth.Check, got str", "conftest.py"),
    ),
    (
        "def pytest_unsloth_modify_checks(config, checks):\n    checks['typo']\n",
        ("pytest_unsloth_modify_checks in conftest.py raised KeyError", "typo"),
    ),
    (
        "import pytest_unsloth\ndef pytest_unsloth_checks(config):\n"
        "    return [pytest_unsloth.Check('cuda', lambda: None)]\n",
        ("two checks are named 'cuda'", "pytest-unsloth", "rename one"),
    ),
]


@pytest.mark.parametrize(
    ("conftest", "needles"), USAGE, ids=[f"{i:02d}" for i in range(len(USAGE))]
)
def test_api_misuse_is_a_usage_error(
    pytester: pytest.Pytester, conftest: str, needles: tuple[str, ...]
):
    pytester.makeconftest(conftest)
    result, out = _run(pytester, *ONE_CHECK)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    _clean(out)
    assert "ERROR: pytest-unsloth:" in out
    for needle in needles:
        assert needle in out, (needle, out)


def test_same_name_in_two_conftests_names_both_files(pytester: pytest.Pytester):
    body = "import pytest_unsloth\n@pytest_unsloth.check('team')\ndef {}():\n    pass\n"
    pytester.makeconftest(body.format("root_check"))
    sub = pytester.mkpydir("sub")
    (sub / "conftest.py").write_text(body.format("sub_check"))
    (sub / "test_x.py").write_text("def test_x():\n    pass\n")
    result, out = _run(pytester, "--unsloth-env", "--unsloth-checks=team", "sub")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    _clean(out)
    assert "two checks are named 'team'" in out
    assert "conftest.py:root_check" in out and "sub/conftest.py:sub_check" in out


# ----------------------------------------------------------------------------------------------
# One check's error; the rest of the session runs.

RETURNS = """
import pytest_unsloth

@pytest_unsloth.check("team-false")
def team_false():
    return False

@pytest_unsloth.check("team-dict")
def team_dict(ctx):
    return {"ok": True}

@pytest_unsloth.check("team-ok")
def team_ok():
    return "fine"

@pytest_unsloth.check("team-isolated", isolated=True, timeout=60)
def team_isolated():
    return 42
"""


def test_check_returning_a_non_string_is_that_checks_error(pytester: pytest.Pytester):
    pytester.makeconftest(RETURNS)
    pytester.makepyfile(test_user="def test_user():\n    pass\n")
    result, out = _run(
        pytester,
        "--unsloth-env",
        "--unsloth-checks=team-false,team-dict,team-ok,team-isolated",
        "test_user.py",
        "--unsloth-report=r.json",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "INTERNALERROR" not in out
    result.assert_outcomes(passed=2, failed=3)  # team-ok and the user's test pass
    assert "check 'team-false' (conftest.py:team_false) returned bool False" in out
    assert "returned dict {'ok': True}" in out
    assert "returned int 42" in out
    assert "raises pytest_unsloth.CheckFailed(found, why, fix) to fail" in out
    records = {c["name"]: c for c in json.loads((pytester.path / "r.json").read_text())["checks"]}
    assert records["team-false"]["status"] == "error"
    assert records["team-ok"]["status"] == "passed"


def test_hook_returning_a_generator_or_none_is_accepted(pytester: pytest.Pytester):
    pytester.makeconftest("""
import pytest_unsloth

def pytest_unsloth_checks(config):
    yield pytest_unsloth.Check("team-gen", lambda: "from a generator")

class Nothing:
    @staticmethod
    def pytest_unsloth_checks(config):
        return None

def pytest_configure(config):
    config.pluginmanager.register(Nothing(), "nothing")
""")
    result, out = _run(pytester, "--unsloth-env", "--unsloth-checks=team-gen", "-v")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED or result.ret == 0, out
    _clean(out)
    assert "unsloth-env::team-gen PASSED" in out


def test_user_property_named_like_ours_changes_nothing(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_user="""
def test_user(record_property):
    record_property("unsloth_check", "not json {")

def test_user_dict(record_property):
    record_property("unsloth_check", '{"name": "python", "status": "failed"}')
"""
    )
    result, out = _run(
        pytester,
        "--unsloth-env",
        "--unsloth-checks=python",
        "test_user.py",
        "--unsloth-report=r.json",
        "--junitxml=j.xml",
    )
    assert result.ret == pytest.ExitCode.OK, out
    _clean(out)
    result.assert_outcomes(passed=3)
    records = json.loads((pytester.path / "r.json").read_text())["checks"]
    assert [(r["name"], r["status"]) for r in records] == [("python", "passed")]


# ----------------------------------------------------------------------------------------------
# Hypothesis over the API surface, in-process: a Check or a clear error, nothing else.

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["team", "team-1", "a.b_c", "Team", "-x", "", "ü"]),
    st.lists(st.text(max_size=4), max_size=2),
    st.just(lambda: None),
    st.just(lambda a, b: None),
    st.just(int),
    st.just(42),
)
KWARGS = st.fixed_dictionaries(
    {},
    optional={
        "description": ANY,
        "needs_gpu": ANY,
        "isolated": ANY,
        "timeout": ANY,
        "cacheable": ANY,
        "probes": ANY,
        "disabled": ANY,
        "source": ANY,
    },
)
API = settings(max_examples=300, deadline=None)


def _ok(ctx: Any) -> None:
    return None


@API
@given(name=ANY, func=ANY, kwargs=KWARGS)
def test_check_constructor_is_valid_or_value_error(name: Any, func: Any, kwargs: dict[str, Any]):
    try:
        c = Check(name, func, **kwargs)
    except ValueError as exc:
        message = str(exc)
        assert "check" in message.lower() or "source" in message
        return
    assert isinstance(c.name, str) and callable(c.func)
    assert c.timeout is None or 0 < c.timeout <= 7 * 24 * 3600
    assert isinstance(c.probes, tuple)


def _fake_config(module: types.ModuleType) -> Any:
    pm = types.SimpleNamespace(get_plugins=lambda: [module], get_name=lambda p: "conftest")
    return types.SimpleNamespace(pluginmanager=pm, rootpath=__import__("pathlib").Path("/"))


@API
@given(name=ANY, target=ANY, kwargs=KWARGS)
def test_check_decorator_gives_a_check_or_a_usage_error(
    name: Any, target: Any, kwargs: dict[str, Any]
):
    kwargs = {k: v for k, v in kwargs.items() if k not in ("probes", "disabled", "source")}
    if target is None:

        def target() -> None:
            return None

    module = types.ModuleType("fake_conftest")
    module.__file__ = "/fake/conftest.py"
    try:
        module.declared = pytest_unsloth.check(name, **kwargs)(target)  # type: ignore[attr-defined]
    except TypeError:
        # only when `name` is callable (bare @check) and the result is then called with target
        assert callable(name)
        return
    try:
        found = decorated_checks(_fake_config(module))
    except pytest.UsageError as exc:
        message = str(exc)
        assert message.startswith("pytest-unsloth: ")
        return
    assert all(isinstance(c, Check) for c in found)


@API
@given(result=st.one_of(ANY, st.lists(ANY, max_size=3), st.just(Check("team", _ok))))
def test_hook_results_are_checks_or_a_usage_error(result: Any):
    try:
        checks = _contributed("pytest_unsloth_checks in conftest.py", result)
    except pytest.UsageError as exc:
        message = str(exc)
        assert "pytest_unsloth_checks in conftest.py" in message and "Fix:" in message
        return
    assert all(isinstance(c, Check) for c in checks)


@API
@given(
    method=st.sampled_from(["disable", "remove", "replace", "add", "getitem"]),
    a=st.one_of(ANY, st.just(Check("one", _ok)), st.just(Check("new", _ok))),
    b=ANY,
)
def test_checklist_edits_are_done_or_a_usage_error(method: str, a: Any, b: Any):
    checks = CheckList([Check("one", _ok), Check("two", _ok)])
    try:
        if method == "disable":
            checks.disable(a, b)
        elif method == "getitem":
            checks[a]
        else:
            getattr(checks, method)(a)
    except pytest.UsageError as exc:
        message = str(exc)
        assert f"checks.{method}" in message or "two checks are named" in message
    except KeyError:
        assert method == "getitem"  # a mapping's own error, named by the hook wrapper
    assert all(isinstance(c, Check) for c in checks)
    assert len(set(checks.names())) == len(checks)


def test_decorator_marks_a_function_with_its_spec():
    @pytest_unsloth.check("team", description="d")
    def team() -> None:
        return None

    assert getattr(team, ATTR)["name"] == "team"
    assert getattr(team, ATTR)["description"] == "d"
