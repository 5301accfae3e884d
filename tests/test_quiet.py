"""The model fixtures add no library noise to the user's output, and hide none of the user's."""

from __future__ import annotations

import pytest

from pytest_unsloth.util.quiet import library_noise_silenced

USER_TESTS = """
import warnings


def test_model(loaded_4bit_model):
    assert loaded_4bit_model.model is not None


def test_adapters(peft_model):
    assert any(p.requires_grad for p in peft_model.parameters())


def test_trainer_builds(grpo_trainer):
    # Building is the plugin's call; trainer.train() is the user's (TRL's warnings there show).
    grpo_trainer(reward_funcs=[lambda completions, **kw: [0.0] * len(completions)])


def test_fails_to_show_captured_logs(loaded_4bit_model):
    raise AssertionError("deliberate: the captured log sections are printed")


def test_users_own_deprecation_still_shows():
    warnings.warn("`torch.jit.script_method` is deprecated (the user's own)", DeprecationWarning)
"""


def _need_stack() -> None:
    # find_spec, not importorskip: pytester drops modules imported during a test, and torch
    # cannot be imported a second time in one process.
    import importlib.util

    for module in ("torch", "transformers", "peft", "bitsandbytes"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


@pytest.mark.slow
def test_fixtures_raise_no_library_warnings_or_log_lines(pytester: pytest.Pytester) -> None:
    _need_stack()
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-W",
        "always::DeprecationWarning",
        "-W",
        "always::FutureWarning",
        timeout=400,
    )
    result.assert_outcomes(passed=4, failed=1)
    out = result.stdout.str()
    assert "kernels-community" not in out
    summary = out.split("warnings summary", 1)[1].split("-- Docs:", 1)[0]
    # The only warning left is the one the user's own test raised.
    assert "(the user's own)" in summary
    for noise in (
        "jit.script_method` is deprecated. Please",
        "is_gradient_checkpointing",
        "LeafSpec",
    ):
        assert noise not in summary, summary


@pytest.mark.slow
def test_fixtures_pass_under_warnings_as_errors(pytester: pytest.Pytester) -> None:
    _need_stack()
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-W",
        "error::DeprecationWarning",
        "-W",
        "error::FutureWarning",
        "-k",
        "test_model or test_adapters or test_trainer_builds",
        timeout=400,
    )
    result.assert_outcomes(passed=3)


def test_filters_last_only_while_the_plugins_code_runs(
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    import logging
    import warnings

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    noise = "`torch.jit.script_method` is deprecated."
    with library_noise_silenced():
        warnings.warn(noise, DeprecationWarning, stacklevel=1)
        warnings.warn("something else is deprecated", DeprecationWarning, stacklevel=1)
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
    assert [str(w.message) for w in recwarn] == ["something else is deprecated"]
    assert "kernels-community" not in caplog.text
    recwarn.clear()
    warnings.warn(noise, DeprecationWarning, stacklevel=1)
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
    assert [str(w.message) for w in recwarn] == [noise]
    assert "kernels-community" in caplog.text
    assert not logger.filters
