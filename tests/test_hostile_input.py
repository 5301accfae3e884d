"""Hostile input: every ini key and CLI option given values of every TOML type.

Each bad value must be a usage error (rc 4, no traceback, no INTERNALERROR) naming the key, the
value, where it came from and the fix; a good one must give a valid ``Settings``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

import pytest

from pytest_unsloth.settings import OPTIONS, Settings, resolve
from subrun import run_pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# pytest 9 reads [tool.pytest] and pytest.toml with native TOML types; pytest 8 ignores both.
PYTEST9 = int(pytest.__version__.split(".")[0]) >= 9
NATIVE = pytest.mark.skipif(not PYTEST9, reason="pytest 8 reads no [tool.pytest] / pytest.toml")


def _native(filename: str, text: str) -> bool:
    return filename == "pytest.toml" or text.startswith("[tool.pytest]\n")


INI_OPTIONS = [o for o in OPTIONS if o.ini]
CLI_VALUE_OPTIONS = [o for o in OPTIONS if o.cli and o.kind != "flag"]
HUGE = "9" * 300


# ----------------------------------------------------------------------------------------------
# A small TOML writer, so hypothesis can write any TOML value into a real pyproject.toml.


def toml_value(value: object) -> str:
    """``value`` as TOML source text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(value)


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
SPECIAL_TEXT = st.sampled_from(
    [
        "1e400",
        "-0",
        "inf",
        "nan",
        "-1",
        HUGE,
        HUGE + "TiB",
        "16GiB",
        "true",
        "cuda",
        "-cuda",
        "num_generations = 4",
        "key == 4",
        "key = import os",
        "novalue",
        "a = 1\na = 2",
        "ключ = 1",
        "",
        " ",
        "trl>=1",
        "rewards:f",
        'cuda "oops',
    ]
)
SCALARS = st.one_of(
    TEXT,
    SPECIAL_TEXT,
    st.integers(),
    st.integers(min_value=10**299, max_value=10**301),
    st.integers(max_value=0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(),
    st.dates(),
    st.times(),
)
TOML_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=5,
)


def _fits(value: object, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and value < 2**31
    if hint is float:
        return isinstance(value, float) and math.isfinite(value) and value >= 0
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if origin is Mapping:
        return isinstance(value, Mapping) and all(
            isinstance(k, str) and k.isidentifier() for k in value
        )
    raise AssertionError(f"no rule for {hint}")


def assert_valid(s: Settings) -> None:
    """Every field has its annotated type, numbers are finite and in range."""
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if f.name == "sources":
            continue
        value = getattr(s, f.name)
        assert _fits(value, hints[f.name]), (f.name, value)
    assert 0 < s.probe_timeout <= 7 * 24 * 3600
    assert 0 < s.gpu_memory_utilization <= 1
    assert 0 <= s.lora_dropout < 1


def _resolve_or_usage_error(config: pytest.Config) -> Settings | None:
    try:
        s = resolve(config)
    except pytest.UsageError as exc:
        message = str(exc)
        assert message.startswith("pytest-unsloth: "), message
        assert "Fix:" in message, message
        return None
    assert_valid(s)
    return s


# ----------------------------------------------------------------------------------------------
# Hypothesis: in-process, real pytest configs (pytester.parseconfig reads the file as pytest does).

FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FAST
@given(
    opt=st.sampled_from(INI_OPTIONS),
    value=TOML_VALUES,
    native=st.booleans() if PYTEST9 else st.just(False),
)
def test_every_ini_key_any_toml_value(
    pytester: pytest.Pytester, opt: Any, value: object, native: bool
) -> None:
    """[tool.pytest] (native types, pytest 9) and [tool.pytest.ini_options] (strings)."""
    table = "[tool.pytest]" if native else "[tool.pytest.ini_options]"
    text = f"{table}\n{opt.ini} = {toml_value(value)}\n"
    tomllib.loads(text)  # the writer itself must produce valid TOML
    (pytester.path / "pyproject.toml").write_text(text, encoding="utf-8")
    config = pytester.parseconfig()
    s = _resolve_or_usage_error(config)
    if s is not None and opt.kind != "flag" and not isinstance(value, (list, dict, str)):
        # A scalar that was accepted came from this key.
        assert s.source(opt.field).startswith(f"ini {opt.ini}")


@FAST
@given(opt=st.sampled_from(INI_OPTIONS), text=st.one_of(TEXT, SPECIAL_TEXT))
def test_every_ini_key_any_override_text(pytester: pytest.Pytester, opt: Any, text: str) -> None:
    """-o KEY=TEXT is read in ini mode (strings split by pytest itself)."""
    config = pytester.parseconfig("-o", f"{opt.ini}={text}")
    _resolve_or_usage_error(config)


@FAST
@given(opt=st.sampled_from(CLI_VALUE_OPTIONS), text=st.one_of(TEXT, SPECIAL_TEXT))
def test_every_cli_option_any_text(pytester: pytest.Pytester, opt: Any, text: str) -> None:
    """Bad CLI values are argparse errors, which pytest raises as UsageError."""
    try:
        config = pytester.parseconfig(f"{opt.cli}={text}")
    except pytest.UsageError:
        return
    _resolve_or_usage_error(config)


def test_options_table_is_fully_covered():
    """New rows of the options table reach the tests above with no edit here."""
    assert {o.ini for o in INI_OPTIONS} >= {"unsloth_probe_timeout", "unsloth_grpo_config"}
    assert all(o.cli.startswith("--unsloth-") for o in CLI_VALUE_OPTIONS if o.cli)


# ----------------------------------------------------------------------------------------------
# Native TOML values that make sense are accepted on pytest 8 and 9 alike.


@NATIVE
def test_native_toml_types_are_accepted_where_they_fit(pytester: pytest.Pytester):
    pytester.makepyprojecttoml("""
[tool.pytest]
unsloth_probe_timeout = 30
unsloth_min_free_vram = 8
unsloth_require_gpu = true
unsloth_lora_dropout = -0.0
unsloth_checks = ["python", "packages"]
unsloth_grpo_config = {num_generations = 4, learning_rate = 5e-6, bf16 = false}
""")
    s = resolve(pytester.parseconfig())
    assert s.probe_timeout == 30.0
    assert s.min_free_vram_gib == 8.0
    assert s.require_gpu is True
    assert s.lora_dropout == 0.0 and math.copysign(1, s.lora_dropout) == 1
    assert s.checks == ("python", "packages")
    assert dict(s.grpo_config) == {"num_generations": 4, "learning_rate": 5e-6, "bf16": False}
    assert s.source("grpo_config") == "ini unsloth_grpo_config in pyproject.toml"


def test_ini_options_booleans_and_numbers_read_natively(pytester: pytest.Pytester):
    """pytest 8 semantics turn them into 'True' / '30'; the result is the same either way."""
    pytester.makepyprojecttoml("""
[tool.pytest.ini_options]
unsloth_probe_timeout = 30.5
unsloth_strict_skips = false
unsloth_max_seq_length = 512
""")
    s = resolve(pytester.parseconfig())
    assert (s.probe_timeout, s.strict_skips, s.max_seq_length) == (30.5, False, 512)


# ----------------------------------------------------------------------------------------------
# End to end: rc 4, one message naming key, value, source and fix, no traceback.

PYPROJECT = "pyproject.toml"

# (file name, file text, extra args, pieces the message must contain)
SCENARIOS: list[tuple[str, str, str, tuple[str, ...]]] = [
    (
        PYPROJECT,
        "[tool.pytest.ini_options]\nunsloth_probe_timeout = 1e400\n",
        "",
        ("unsloth_probe_timeout", "'inf'", "pyproject.toml", "not a positive number"),
    ),
    (
        PYPROJECT,
        f"[tool.pytest.ini_options]\nunsloth_max_seq_length = 1{'0' * 300}\n",
        "",
        ("unsloth_max_seq_length", "1000000", "pyproject.toml", "too large (at most 2147483647)"),
    ),
    (
        PYPROJECT,
        "[tool.pytest]\nunsloth_require_gpu = 1\n",
        "",
        ("unsloth_require_gpu", "= 1:", "pyproject.toml", "it is an integer", "true or false"),
    ),
    (
        PYPROJECT,
        "[tool.pytest]\nunsloth_checks = [1, [2]]\n",
        "",
        ("unsloth_checks", "[1, [2]]", "item 0 (1) is an integer", "list of strings"),
    ),
    (
        PYPROJECT,
        "[tool.pytest.ini_options]\nunsloth_model = {a = 1}\n",
        "",
        ("unsloth_model", "{'a': 1}", "it is a table", "a model id or path"),
    ),
    (
        PYPROJECT,
        "[tool.pytest.ini_options]\nunsloth_lora_r = 2026-01-01\n",
        "",
        ("unsloth_lora_r", "datetime.date(2026, 1, 1)", "it is a date/time", "positive integer"),
    ),
    (
        PYPROJECT,
        "[tool.pytest.ini_options]\nunsloth_gpu_memory_utilization = nan\n",
        "",
        ("unsloth_gpu_memory_utilization", "'nan'", "fraction in (0, 1]"),
    ),
    (
        PYPROJECT,
        f'[tool.pytest.ini_options]\nunsloth_min_free_vram = "{HUGE}TiB"\n',
        "",
        ("unsloth_min_free_vram", "99999", "more than 1 EiB", "16GiB"),
    ),
    (
        PYPROJECT,
        "[tool.pytest]\nunsloth_grpo_config = 4\n",
        "",
        ("unsloth_grpo_config", "= 4:", "it is an integer", "'key = value' lines"),
    ),
    (
        "pytest.toml",
        "[pytest]\nunsloth_dataset = true\n",
        "",
        ("unsloth_dataset", "= True", "pytest.toml", "it is a boolean", "a file path"),
    ),
    (
        "tox.ini",
        '[pytest]\nunsloth_checks = cuda "oops\n',
        "",
        ("unsloth_checks", "tox.ini", "pytest cannot read it", "No closing quotation"),
    ),
    (
        "tox.ini",
        "[pytest]\nunsloth_grpo_config =\n    num_generations == 4\n",
        "",
        ("unsloth_grpo_config", "tox.ini", "'num_generations == 4'", "'= 4'", "Python literal"),
    ),
    (
        "tox.ini",
        "[pytest]\nunsloth_grpo_config =\n    output_dir = import os\n",
        "",
        ("unsloth_grpo_config", "'import os'", "neither a Python literal", "quote text"),
    ),
    (
        "tox.ini",
        "[pytest]\nunsloth_grpo_config =\n    novalue\n",
        "",
        ("unsloth_grpo_config", "'novalue'", "is not 'key = value'", "num_generations = 4"),
    ),
    (
        "tox.ini",
        "[pytest]\nunsloth_grpo_config =\n    beta = 0.1\n    beta = 0.2\n",
        "",
        ("unsloth_grpo_config", "beta is set twice", "'beta = 0.1'", "'beta = 0.2'"),
    ),
    (
        "tox.ini",
        "[pytest]\nunsloth_grpo_config =\n    num_generations =\n",
        "",
        ("unsloth_grpo_config", "'num_generations ='", "has no value"),
    ),
    (
        "tox.ini",
        "[pytest]\nunsloth_grpo_config =\n    ключ-1 = 1\n",
        "",
        ("unsloth_grpo_config", "'ключ-1 = 1'", "is not 'key = value'"),
    ),
    (
        "setup.cfg",
        f"[tool:pytest]\nunsloth_probe_timeout = 1{'0' * 300}\n",
        "",
        ("unsloth_probe_timeout", "setup.cfg", "more than a week"),
    ),
    (
        "tox.ini",
        "[pytest]\nunsloth_lora_r = 8\n",
        "-o unsloth_lora_r=1e3",
        (
            "-o unsloth_lora_r (--override-ini)",
            "'1e3'",
            "not a whole number",
            "set -o unsloth_lora_r",
        ),
    ),
    (
        "tox.ini",
        "[pytest]\n",
        "--unsloth-probe-timeout=1e400",
        ("argument --unsloth-probe-timeout", "'1e400'", "expected a positive number of seconds"),
    ),
    (
        "tox.ini",
        "[pytest]\n",
        f"--unsloth-min-free-vram={HUGE}TiB",
        ("argument --unsloth-min-free-vram", "more than 1 EiB", "expected an amount of memory"),
    ),
    (
        "tox.ini",
        "[pytest]\n",
        f"--unsloth-gpus-per-worker={'9' * 5000}",
        ("argument --unsloth-gpus-per-worker", "chars)", "expected a positive integer"),
    ),
    (
        "tox.ini",
        "[pytest]\n",
        "--unsloth-probe-timeout=-0",
        ("argument --unsloth-probe-timeout", "'-0' is not a positive number"),
    ),
    (
        "tox.ini",
        "[pytest]\n",
        "--unsloth-probe-timeout=nan",
        ("argument --unsloth-probe-timeout", "'nan' is not a positive number"),
    ),
]


@pytest.mark.parametrize(
    ("filename", "text", "args", "needles"),
    [
        pytest.param(*sc, id=f"{i:02d}-{sc[0]}", marks=[NATIVE] if _native(sc[0], sc[1]) else [])
        for i, sc in enumerate(SCENARIOS)
    ],
)
def test_hostile_value_is_a_usage_error(
    pytester: pytest.Pytester, filename: str, text: str, args: str, needles: tuple[str, ...]
):
    (pytester.path / filename).write_text(text, encoding="utf-8")
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest(*args.split())
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert "INTERNALERROR" not in out
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, (needle, out)
    if not args.startswith("--"):  # argparse's own format has "(expected ...)" as the fix
        assert "Fix:" in out
        if not args:
            assert str(pytester.path / filename) in out  # the full path of the file to edit


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        pytest.param(PYPROJECT, "[tool.pytest]\nunsloth_lora_alpha = [[16]]\n", marks=NATIVE),
        (PYPROJECT, f"[tool.pytest.ini_options]\nunsloth_probe_cache_max_age = -{HUGE}\n"),
        ("tox.ini", "[pytest]\nunsloth_grpo_config =\n    num_generations = 4\n    = 3\n"),
    ],
)
def test_hostile_value_in_a_real_subprocess(pytester: pytest.Pytester, filename: str, text: str):
    """The same through a real pytest process and the plugin's entry point."""
    (pytester.path / filename).write_text(text, encoding="utf-8")
    result, out = run_pytest(pytester, "--unsloth-env", timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert "pytest-unsloth: ini unsloth_" in out and "Fix:" in out
    assert "Traceback" not in out and "INTERNALERROR" not in out


# ----------------------------------------------------------------------------------------------
# GRPO settings of the wrong type: a finding naming the key, not TRL's arithmetic error.


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"num_generations": "four"}, "num_generations = 'four' is a string"),
        ({"per_device_train_batch_size": 1.5}, "per_device_train_batch_size = 1.5 is a float"),
        ({"learning_rate": float("inf")}, "learning_rate = inf is not finite"),
        ({"bf16": "yes"}, "bf16 = 'yes' is a string"),
        ({"reward_weights": [1.0, "x"]}, "reward_weights = [1.0, 'x'] is a list"),
        (
            {"num_generations": 4, "gradient_accumulation_steps": [2]},
            "gradient_accumulation_steps = [2] is a list",
        ),
    ],
)
def test_grpo_values_of_the_wrong_type_name_their_key(config: dict[str, Any], needle: str):
    pytest.importorskip("trl")
    from pytest_unsloth.grpo.config import check_grpo_config

    report = check_grpo_config(config, unsloth=False)
    codes = [p.code for p in report.problems]
    assert codes == ["wrong-type"], report.problems
    found = report.problems[0].found
    assert needle in found
    assert "GRPOConfig wants" in found
    assert "e.g." in report.problems[0].fix


def test_grpo_wrong_type_end_to_end_is_a_finding(pytester: pytest.Pytester):
    pytest.importorskip("trl")
    pytester.makeini(
        "[pytest]\nunsloth_grpo_config =\n    num_generations = 'four'\n"
        "    per_device_train_batch_size = 1.5\n"
    )
    result, out = run_pytest(pytester, "--unsloth-env", "--unsloth-checks=grpo-config", timeout=300)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "num_generations = 'four' is a string" in out
    assert "per_device_train_batch_size = 1.5 is a float" in out
    assert "unsupported operand" not in out and "INTERNALERROR" not in out


def test_grpo_unicode_key_is_an_unknown_key_finding(pytester: pytest.Pytester):
    """A valid Python name that is no GRPOConfig field reaches the check, which names it."""
    pytest.importorskip("trl")
    from pytest_unsloth.grpo.config import check_grpo_config

    pytester.makeini("[pytest]\nunsloth_grpo_config =\n    ключ = 1\n    num_generations = 4\n")
    s = resolve(pytester.parseconfig())
    assert dict(s.grpo_config) == {"ключ": 1, "num_generations": 4}
    report = check_grpo_config(s.grpo_config, unsloth=False)
    assert [p.code for p in report.problems] == ["unknown-key"]
    assert "ключ = 1 is not a GRPOConfig field" in report.problems[0].found
