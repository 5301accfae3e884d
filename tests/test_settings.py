"""Settings: one order (CLI > ini > default), clean usage errors for bad values."""

from __future__ import annotations

import pytest

from pytest_unsloth.settings import parse_amount_bytes
from pytest_unsloth.util.units import GIB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (16, 16 * GIB),
        (0.5, GIB // 2),
        ("16", 16 * GIB),
        ("16GiB", 16 * GIB),
        ("16 GiB", 16 * GIB),
        ("16GB", 16 * 10**9),
        ("16000MiB", 16000 * 1024**2),
        ("1.5 tb", int(1.5 * 10**12)),
    ],
)
def test_amounts(text: object, expected: int):
    assert parse_amount_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "-1", "16 parsecs", "GiB", "nan", True, None, [16], -3])
def test_bad_amounts(bad: object):
    with pytest.raises(ValueError):
        parse_amount_bytes(bad)


def _settings(pytester: pytest.Pytester, *args: str):
    from pytest_unsloth.settings import get_settings

    config = pytester.parseconfigure(*args)
    return get_settings(config)


def test_defaults(pytester: pytest.Pytester):
    s = _settings(pytester)
    assert s.env is False
    assert s.probe_timeout == 300.0
    assert s.min_free_vram_gib is None
    assert s.source("probe_timeout") == "default"


def test_cli_beats_ini(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nunsloth_probe_timeout = 30\nunsloth_min_free_vram = 8GiB\n")
    s = _settings(pytester, "--unsloth-probe-timeout=12")
    assert s.probe_timeout == 12.0
    assert s.source("probe_timeout") == "--unsloth-probe-timeout"
    assert s.min_free_vram_gib == 8.0
    assert s.source("min_free_vram_gib") == "ini unsloth_min_free_vram in tox.ini"


def test_list_settings_and_grpo_lines(pytester: pytest.Pytester):
    pytester.makepyprojecttoml("""
[tool.pytest.ini_options]
unsloth_require = ["unsloth", "trl"]
unsloth_pins = ["trl>=0.20", "peft>=0.15"]
unsloth_reward_funcs = ["rewards:format_reward", "rewards:correctness"]
unsloth_grpo_config = [
    "num_generations = 4", "learning_rate = 5e-6", "lr_scheduler_type = cosine", "bf16 = False",
]
""")
    s = _settings(pytester)
    assert s.require == ("unsloth", "trl")
    assert s.pins == ("trl>=0.20", "peft>=0.15")
    assert s.reward_funcs == ("rewards:format_reward", "rewards:correctness")
    assert dict(s.grpo_config) == {
        "num_generations": 4,
        "learning_rate": 5e-6,
        "lr_scheduler_type": "cosine",
        "bf16": False,
    }


def test_settings_are_frozen(pytester: pytest.Pytester):
    import dataclasses

    s = _settings(pytester)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.probe_timeout = 1  # type: ignore[misc, unused-ignore]


@pytest.mark.parametrize(
    ("ini", "needle"),
    [
        ("unsloth_probe_timeout = soon", "ini unsloth_probe_timeout in tox.ini = 'soon'"),
        ("unsloth_probe_timeout = -4", "is not a positive number"),
        ("unsloth_min_free_vram = lots", "is not an amount of memory"),
        ("unsloth_gpu_memory_utilization = 1.5", "is not a fraction in (0, 1]"),
        ("unsloth_require_gpu = maybe", "is not a boolean"),
        ("unsloth_dtype = int4", "is not a dtype"),
        ("unsloth_gradient_checkpointing = always", "is not one of unsloth, true, false"),
        ("unsloth_pins = trl>>1", "'trl>>1' is not a PEP 440 requirement"),
        ("unsloth_reward_funcs = rewards.format_reward", "is not an import path"),
        ("unsloth_grpo_config =\n    num_generations 4", "is not 'key = value'"),
        ("unsloth_require = trl>=1", "is not a distribution name"),
    ],
)
def test_bad_ini_values_are_usage_errors(pytester: pytest.Pytester, ini: str, needle: str):
    pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest("--unsloth-env")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert needle in err
    assert "Fix:" in err
    assert "INTERNALERROR" not in err + result.stdout.str()


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("--unsloth-probe-timeout=0", "argument --unsloth-probe-timeout"),
        ("--unsloth-min-free-vram=plenty", "argument --unsloth-min-free-vram"),
        ("--unsloth-gpus-per-worker=0", "argument --unsloth-gpus-per-worker"),
    ],
)
def test_bad_cli_values_are_argparse_errors(pytester: pytest.Pytester, arg: str, needle: str):
    result = pytester.runpytest(arg)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert needle in result.stderr.str()


def test_readme_configuration_reference_matches_the_code():
    from pathlib import Path

    from pytest_unsloth.settings import options_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text("utf-8")
    table = readme.split("<!-- options:start -->\n", 1)[1].split("<!-- options:end -->", 1)[0]
    assert table == options_markdown(), "run `python -m pytest_unsloth.settings` and paste it"
