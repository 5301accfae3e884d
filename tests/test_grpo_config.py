"""check_grpo_config against the installed TRL GRPOConfig: every error path, plus what TRL skips."""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import pytest

from pytest_unsloth.grpo.config import check_grpo_config

# Every case builds the installed TRL's GRPOConfig (check_grpo_config does too).
pytest.importorskip("trl")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _parallelism() -> Any:
    from accelerate import ParallelismConfig

    return ParallelismConfig(cp_size=2)


# One case per `raise` in the installed GRPOConfig.__post_init__: (settings, TRL's words, fix).
POST_INIT_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("sequence-parallel", {"parallelism_config": "cp"}, "sequence-dim parallelism", "cp_size=1"),
    (
        "hub-repo-without-log",
        {"log_completions_hub_repo": "me/completions"},
        "log_completions is False",
        "Enable log_completions",
    ),
    (
        "auto-find-batch-size",
        {"auto_find_batch_size": True},
        "auto_find_batch_size is not supported",
        "lower per_device_train_batch_size",
    ),
    (
        "generation-batch-vs-global",
        {"generation_batch_size": 5, "per_device_train_batch_size": 2, "num_generations": 2},
        "must be divisible by the global batch size",
        "multiple of per_device_train_batch_size",
    ),
    (
        "both-generation-settings",
        {"generation_batch_size": 4, "steps_per_generation": 2},
        "can not be both configured",
        "set only one of generation_batch_size and steps_per_generation",
    ),
    (
        "eval-batch",
        {
            "do_eval": True,
            "eval_strategy": "steps",
            "eval_steps": 10,
            "per_device_eval_batch_size": 3,
            "num_generations": 2,
            "per_device_train_batch_size": 2,
        },
        "eval batch size",
        "per_device_eval_batch_size x GPUs a multiple of num_generations (2)",
    ),
    (
        "generation-batch-vs-num-generations",
        {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "num_generations": 6},
        "generation_batch_size (4) must be divisible by num_generations (6)",
        "per_device_train_batch_size = 6",
    ),
    (
        "one-generation",
        {"num_generations": 1, "per_device_train_batch_size": 1},
        "at least 2 generations",
        "num_generations >= 2",
    ),
    (
        "clip-min-above-max",
        {"vllm_importance_sampling_clip_min": 3.0, "vllm_importance_sampling_clip_max": 2.0},
        "must be less than",
        "change the setting named in the message",
    ),
    (
        "truncate-without-clip",
        {
            "vllm_importance_sampling_correction": True,
            "vllm_importance_sampling_mode": "token_truncate",
            "vllm_importance_sampling_clip_min": None,
            "vllm_importance_sampling_clip_max": None,
        },
        "At least one of `vllm_importance_sampling_clip_min`",
        "change the setting named in the message",
    ),
]


def test_cases_cover_every_raise_in_installed_post_init() -> None:
    from trl import GRPOConfig  # type: ignore[attr-defined]

    tree = ast.parse(textwrap.dedent(inspect.getsource(GRPOConfig.__post_init__)))
    raises = [n for n in ast.walk(tree) if isinstance(n, ast.Raise)]
    assert len(raises) == len(POST_INIT_CASES), "TRL changed GRPOConfig: add the new error path"


@pytest.mark.parametrize(
    ("settings", "message", "fix"),
    [c[1:] for c in POST_INIT_CASES],
    ids=[c[0] for c in POST_INIT_CASES],
)
def test_post_init_error_becomes_failure_with_fix(
    settings: dict[str, Any], message: str, fix: str
) -> None:
    from trl import GRPOConfig  # type: ignore[attr-defined]

    if settings.get("parallelism_config") == "cp":
        settings = {**settings, "parallelism_config": _parallelism()}
    # The case really is an error of the installed TRL ...
    with pytest.raises(ValueError, match=r".") as excinfo:
        GRPOConfig(output_dir="unused", use_cpu=True, report_to="none", **settings)
    assert message in str(excinfo.value)
    # ... and the check reports it with TRL's words and a fix.
    report = check_grpo_config(settings, unsloth=False)
    assert not report.ok
    (p,) = [p for p in report.problems if p.code == "trl-error"]
    assert message in p.found
    assert fix in p.fix, p.fix


def test_fp16_and_bf16_together() -> None:
    report = check_grpo_config({"bf16": True, "fp16": True}, unsloth=False)
    (p,) = report.problems
    assert "At most one of fp16 and bf16" in p.found
    assert p.fix == "set only one of bf16 and fp16 to True"


def test_every_unknown_key_reported_at_once() -> None:
    from trl import GRPOConfig  # type: ignore[attr-defined]

    settings: dict[str, Any] = {
        "max_prompt_length": 256,
        "warmup_ratio": 0.1,
        "learnin_rate": 1e-5,
        "num_generations": 2,
        "per_device_train_batch_size": 2,
    }
    # Python names only the first unknown keyword.
    with pytest.raises(TypeError, match="max_prompt_length"):
        GRPOConfig(output_dir="unused", use_cpu=True, **settings)
    report = check_grpo_config(settings, unsloth=False)
    unknown = {p.found.split(" ", 1)[0]: p for p in report.problems if p.code == "unknown-key"}
    assert set(unknown) == {"max_prompt_length", "warmup_ratio", "learnin_rate"}
    from importlib.metadata import version

    assert f"installed trl {version('trl')}" in unknown["max_prompt_length"].found
    assert f"installed transformers {version('transformers')}" in unknown["warmup_ratio"].found
    assert "warmup_steps" in unknown["warmup_ratio"].fix
    assert unknown["learnin_rate"].fix == "did you mean 'learning_rate'?"
    assert len(report.problems) == 3  # the known keys build a valid config


def test_valid_config_on_cpu_is_ok_and_bf16_default_is_not_blamed_on_cpu() -> None:
    report = check_grpo_config(
        {"num_generations": 4, "per_device_train_batch_size": 4}, unsloth=False
    )
    assert report.ok, report.format()
    assert report.values["bf16"] is True  # TRL's default, kept for the GPU checks
    assert report.values["generation_batch_size"] == 4
    assert "generation_batch_size 4" in report.summary()


def test_grpo_config_instance_is_accepted() -> None:
    from trl import GRPOConfig  # type: ignore[attr-defined]

    config = GRPOConfig(
        output_dir="unused", use_cpu=True, num_generations=2, per_device_train_batch_size=2
    )
    report = check_grpo_config(config, model_max_length=256, unsloth=False)
    assert [p.code for p in report.problems] == ["completion-beyond-context"]


def gpu(cuda_index: int, name: str, capability: tuple[int, int]) -> Any:
    from pytest_unsloth.gpu import GpuDevice

    return GpuDevice(
        nvml_index=cuda_index,
        cuda_index=cuda_index,
        uuid=f"GPU-{cuda_index}",
        name=name,
        capability=capability,
        total_bytes=16 << 30,
        free_bytes=15 << 30,
        used_bytes=1 << 30,
        is_mig=False,
    )


def snapshot(*devices: Any) -> Any:
    from pytest_unsloth.gpu import NvmlSnapshot

    return NvmlSnapshot(
        available=True,
        error=None,
        driver_version="580.159.04",
        cuda_driver_version=13000,
        devices=devices,
        visible=devices,
        cuda_visible_devices=None,
    )


def test_bf16_on_a_gpu_without_bf16() -> None:
    settings = {"num_generations": 2, "per_device_train_batch_size": 2}
    report = check_grpo_config(settings, gpus=snapshot(gpu(0, "Tesla T4", (7, 5))), unsloth=False)
    (p,) = report.problems
    assert p.code == "bf16-unsupported"
    assert "cuda:0 (Tesla T4)" in p.found
    assert p.fix == "set bf16 = False and fp16 = True"
    fixed = check_grpo_config(
        {**settings, "bf16": False, "fp16": True}, gpus=snapshot(gpu(0, "Tesla T4", (7, 5)))
    )
    assert fixed.ok, fixed.format()
    assert check_grpo_config(settings, gpus=snapshot(gpu(0, "H100", (9, 0)))).ok


def test_use_vllm_without_vllm_installed() -> None:
    from importlib.util import find_spec

    if find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    report = check_grpo_config(
        {"use_vllm": True, "num_generations": 2, "per_device_train_batch_size": 2}, unsloth=False
    )
    assert [p.code for p in report.problems] == ["vllm-missing"]


def test_unsloth_rewrite_is_a_warning_instead_of_trl_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    settings = {
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 4,
        "num_generations": 6,
    }
    report = check_grpo_config(settings, unsloth=True)
    assert report.ok
    (p,) = report.problems
    assert (p.code, p.severity) == ("unsloth-batch-rewrite", "warning")
    assert "silently sets per_device_train_batch_size = 6" in p.found
    # Without unsloth the same settings are TRL's error.
    assert not check_grpo_config(settings, unsloth=False).ok
    # A divisible batch is left alone by unsloth.
    ok = check_grpo_config({**settings, "gradient_accumulation_steps": 6}, unsloth=True)
    assert not ok.problems


def test_completion_beyond_model_context() -> None:
    report = check_grpo_config(
        {"max_completion_length": 4096, "num_generations": 2, "per_device_train_batch_size": 2},
        model_max_length=2048,
        unsloth=False,
    )
    (p,) = report.problems
    assert p.code == "completion-beyond-context"
    assert "4096 >= the model's context 2048" in p.found


def test_several_gpus_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    settings = {"num_generations": 2, "per_device_train_batch_size": 2}
    gpus = snapshot(gpu(0, "H100", (9, 0)), gpu(1, "H100", (9, 0)))
    report = check_grpo_config(settings, gpus=gpus, unsloth=False)
    (p,) = report.problems
    assert (p.code, p.severity) == ("no-launcher", "warning")
    assert "accelerate launch --num_processes 2" in p.fix
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not check_grpo_config(settings, gpus=gpus, unsloth=False).problems


@pytest.mark.parametrize("bad", ["2048", 2048.0, True, [2048]])
def test_model_max_length_that_is_not_an_int_names_itself(bad: Any):
    with pytest.raises(TypeError, match=r"model_max_length=.*pass the model's context length"):
        check_grpo_config({"output_dir": "out"}, model_max_length=bad)
