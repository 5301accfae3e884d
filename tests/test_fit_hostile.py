"""The memory estimator, its check, marker and CLI given broken or hostile configs and settings.

Every path answers with a ValueError naming the key (a usage error, a failed check, a marker
error), never an OverflowError, TypeError or traceback from inside the arithmetic.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_unsloth.fit import estimate_memory
from subrun import fit_cli

GRID = Path(__file__).parent / "data" / "fit_grid.jsonl"
CONFIGS = {r["model"]: r["config"] for r in map(json.loads, GRID.read_text().splitlines())}
LLAMA = CONFIGS["llama-3.2-1b"]
MOE = {**LLAMA, "model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2}


@pytest.mark.parametrize(
    ("base", "key", "value"),
    [
        (LLAMA, "hidden_size", "2048"),
        (LLAMA, "hidden_size", 1e308),
        (LLAMA, "hidden_size", math.inf),
        (LLAMA, "vocab_size", 2**62),
        (LLAMA, "num_hidden_layers", True),
        (LLAMA, "num_attention_heads", -4),
        (LLAMA, "head_dim", math.inf),
        (LLAMA, "head_dim", "64"),
        (LLAMA, "head_dim", 0),
        (LLAMA, "head_dim", 1e308),
        (LLAMA, "tie_word_embeddings", "yes"),
        (LLAMA, "tie_word_embeddings", math.nan),
        (LLAMA, "attention_bias", {}),
        (LLAMA, "model_type", {}),
        (LLAMA, "model_type", 3),
        (MOE, "num_experts", 1e308),
        (MOE, "num_experts", {}),
        (MOE, "num_experts_per_tok", math.inf),
        (MOE, "num_experts_per_tok", -1),
        (MOE, "moe_intermediate_size", "1408"),
        (MOE, "shared_expert_intermediate_size", [5632]),
    ],
)
def test_a_hostile_config_value_is_a_value_error_naming_the_key(
    base: dict[str, Any], key: str, value: Any
):
    with pytest.raises(ValueError, match=key):
        estimate_memory({**base, key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [("hidden_size", "1152"), ("hidden_size", 1e308), ("image_size", -1), ("patch_size", 0)],
)
def test_a_hostile_vision_config_is_a_value_error_naming_it(key: str, value: Any):
    vision = {"model_type": "siglip_vision_model", key: value}
    with pytest.raises(ValueError, match=f"vision_config: config key '{key}'"):
        estimate_memory(
            {"model_type": "gemma3", "text_config": CONFIGS["gemma-3-1b"], "vision_config": vision}
        )


def test_heads_wider_than_the_hidden_size_leave_no_head_dim():
    no_head_dim = {k: v for k, v in LLAMA.items() if k != "head_dim"}
    with pytest.raises(ValueError, match="leaves no head_dim"):
        estimate_memory({**no_head_dim, "hidden_size": 16, "num_attention_heads": 32})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("beta", math.nan),
        ("beta", math.inf),
        ("beta", {}),
        ("beta", -0.1),
        ("gpu_memory_utilization", {}),
        ("gpu_memory_utilization", math.nan),
        ("max_completion_length", math.inf),
        ("max_completion_length", 1e308),
        ("max_seq_length", 2**40),
        ("lora_r", 2.5),
        ("per_device_train_batch_size", "many"),
        ("gpu_total_memory", {}),
        ("gpu_total_memory", -1),
        ("max_lora_rank", 0),
        ("target_modules", 3),
        ("target_modules", [1, 2]),
        ("target_modules", []),
    ],
)
def test_a_hostile_setting_is_a_value_error_naming_it(key: str, value: Any):
    with pytest.raises(ValueError, match=key):
        estimate_memory(LLAMA, **{key: value})


JSONISH = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
KEYS = [*LLAMA, "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size"]


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([LLAMA, MOE]),
    changes=st.dictionaries(st.sampled_from(KEYS), JSONISH, min_size=1, max_size=3),
    task=st.sampled_from(["sft", "grpo"]),
)
def test_any_config_gives_an_estimate_or_a_value_error(
    base: dict[str, Any], changes: dict[str, Any], task: str
):
    cfg = {**base, **changes}
    if cfg.get("model_type") not in ("llama", "qwen2_moe"):
        cfg["model_type"] = base["model_type"]  # an unknown family builds on the meta device
    try:
        est = estimate_memory(cfg, task=task)
    except ValueError:
        return
    assert isinstance(est.total_bytes, int) and est.total_bytes > 0
    assert all(isinstance(v, int) and v >= 0 for v in est.parts.values())


def test_config_files_that_are_not_configs(tmp_path: Path):
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        estimate_memory(deep)
    listing = tmp_path / "list"
    listing.mkdir()
    (listing / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        estimate_memory(listing)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError):
        estimate_memory(binary)


def test_an_unknown_family_transformers_cannot_build_is_a_value_error():
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="not a family the estimator knows"):
        estimate_memory({"model_type": "no-such-architecture", "hidden_size": 64})
    with pytest.raises(ValueError, match="no model_type"):
        estimate_memory({"hidden_size": 64})


def _project(pytester: pytest.Pytester, config: str) -> None:
    folder = pytester.path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    pytester.makeini("[pytest]\nunsloth_model = model\nunsloth_fit_target = 24GiB\n")


@pytest.mark.parametrize(
    "config",
    [
        json.dumps({**LLAMA, "head_dim": 1e308}),
        json.dumps({**LLAMA, "hidden_size": "2048"}),
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["overflowing-head-dim", "string-size", "deeply-nested"],
)
def test_the_fit_check_fails_cleanly_on_a_hostile_config(pytester: pytest.Pytester, config: str):
    _project(pytester, config)
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=fit", "-p", "no:randomly")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "cannot estimate" in out and "config.json" in out
    assert "Traceback" not in out and "OverflowError" not in out and "INTERNALERROR" not in out


def test_the_fit_check_fails_cleanly_when_config_json_is_a_folder(pytester: pytest.Pytester):
    folder = pytester.path / "model"
    (folder / "config.json").mkdir(parents=True)
    pytester.makeini("[pytest]\nunsloth_model = model\nunsloth_fit_target = 24GiB\n")
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks=fit", "-p", "no:randomly")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "config.json" in out and "INTERNALERROR" not in out and "Traceback" not in out


def test_requires_fit_with_a_hostile_config_is_an_error_naming_it(pytester: pytest.Pytester):
    folder = pytester.path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": 2**62}))
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_fit(model="model", task="grpo", max_completion_length=float("inf"))
        def test_settings():
            pass

        @pytest.mark.requires_fit(model="model")
        def test_config():
            pass
        """
    )
    result = pytester.runpytest("-rA", "-p", "no:randomly")
    result.assert_outcomes(errors=2)
    out = result.stdout.str()
    assert "max_completion_length=inf" in out and "vocab_size" in out
    assert "OverflowError" not in out and "INTERNALERROR" not in out


def test_the_cli_turns_a_hostile_config_into_a_usage_error(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "num_attention_heads": 1e308}))
    proc = fit_cli(str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "num_attention_heads" in proc.stderr


def _budget(tmp_path: Path, budget: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    return fit_cli(str(tmp_path), f"--budget={budget}")


def test_a_budget_below_the_weights_says_nothing_else_can_make_room(tmp_path: Path):
    proc = _budget(tmp_path, "1MiB")
    assert proc.returncode == 1, proc.stderr
    last = proc.stdout.splitlines()[-1]
    # a small amount reads in MiB, not as "0.0 GiB"
    assert last.startswith("does not fit in 1 MiB; settings that fit: none (the weights")
    assert "no batch size, length or generation count makes room" in last


def test_a_zero_budget_is_a_budget(tmp_path: Path):
    proc = _budget(tmp_path, "0GiB")
    assert proc.returncode == 1 and "does not fit in 0 MiB" in proc.stdout, proc.stdout


@pytest.mark.parametrize("budget", ["-5GiB", "1e400GiB", "nanGiB", "infGiB", "lots"])
def test_a_budget_that_is_not_an_amount_is_a_usage_error(tmp_path: Path, budget: str):
    proc = _budget(tmp_path, budget)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert budget in proc.stderr and "not an amount of memory" in proc.stderr
