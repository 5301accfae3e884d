"""GRPO configuration: build the installed TRL's GRPOConfig and check what it does not.

``GRPOConfig.__post_init__`` is the cheapest real validation (batch arithmetic, num_generations),
but Python stops at the first unknown keyword and TRL cannot know the GPU, vLLM, unsloth or the
model's context. This module reports every unknown key at once, turns TRL's errors into fixes,
and adds those checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pytest_unsloth.findings import Finding
from pytest_unsloth.grpo.problems import ReportText, errors, installed_version

__all__ = ["ConfigReport", "check_grpo_config"]

# Keys older guides still pass: which library dropped them and what replaces them.
_REMOVED: dict[str, tuple[str, str, str]] = {
    "max_prompt_length": (
        "trl",
        "TRL 1.x GRPOConfig has no max_prompt_length and never truncates prompts",
        "remove it; keep prompts short in the dataset (see check_length_budget)",
    ),
    "warmup_ratio": (
        "transformers",
        "transformers 5 TrainingArguments dropped warmup_ratio",
        "use warmup_steps = round(warmup_ratio * max_steps)",
    ),
    "evaluation_strategy": (
        "transformers",
        "transformers renamed evaluation_strategy",
        "use eval_strategy",
    ),
    "per_gpu_train_batch_size": (
        "transformers",
        "transformers removed per_gpu_train_batch_size",
        "use per_device_train_batch_size",
    ),
    "use_vllm_server": ("trl", "TRL replaced use_vllm_server", "use vllm_mode = 'server'"),
}


@dataclasses.dataclass(frozen=True, repr=False)
class ConfigReport(ReportText):
    """Findings about one GRPO configuration, plus the effective values used."""

    problems: tuple[Finding, ...]
    values: Mapping[str, Any]
    trl_version: str | None
    transformers_version: str | None

    @property
    def ok(self) -> bool:
        """Whether GRPOTrainer would accept the config on the described hardware."""
        return not errors(self.problems)

    def summary(self) -> str:
        """One line with the batch arithmetic."""
        v = self.values
        return (
            f"num_generations {v.get('num_generations')}, per_device_train_batch_size "
            f"{v.get('per_device_train_batch_size')}, gradient_accumulation_steps "
            f"{v.get('gradient_accumulation_steps')}, generation_batch_size "
            f"{v.get('generation_batch_size')}, max_completion_length "
            f"{v.get('max_completion_length')} (TRL {self.trl_version}, transformers "
            f"{self.transformers_version})"
        )


def _fix_for(message: str, values: Mapping[str, Any]) -> str:
    """Turn one of TRL's GRPOConfig errors into a concrete fix."""
    ng = values.get("num_generations", 8)
    bs = values.get("per_device_train_batch_size", 8)
    ga = values.get("gradient_accumulation_steps", 1)
    if "must be divisible by num_generations" in message:
        return (
            f"make per_device_train_batch_size x gradient_accumulation_steps x GPUs a multiple "
            f"of num_generations ({ng}): e.g. per_device_train_batch_size = {ng}, or "
            f"gradient_accumulation_steps = {ng // _gcd(ng, bs)} with batch {bs}"
            if isinstance(ng, int) and isinstance(bs, int)
            else "make the generation batch a multiple of num_generations"
        )
    if "at least 2 generations" in message:
        return "set num_generations >= 2 (GRPO compares completions within a group)"
    if "divisible by the global batch size" in message:
        return (
            f"set generation_batch_size to a multiple of per_device_train_batch_size x GPUs "
            f"({bs} per GPU), or leave it unset"
        )
    if "can not be both configured" in message:
        return "set only one of generation_batch_size and steps_per_generation"
    if "eval batch size" in message:
        return f"make per_device_eval_batch_size x GPUs a multiple of num_generations ({ng})"
    if "fp16 and bf16" in message:
        return "set only one of bf16 and fp16 to True"
    if "bf16" in message and "support" in message:
        return "set bf16 = False (fp16 = True on pre-Ampere GPUs) or train on an Ampere+ GPU"
    if "logging_steps" in message or "save_steps" in message or "eval_steps" in message:
        return "use a whole number of steps (or a fraction below 1)"
    if "warmup_steps" in message:
        return "use warmup_steps >= 0"
    sentences = re.findall(r"(?:Set|Enable|Use|Please)[^.]*\.", message)
    if sentences:
        return str(sentences[-1])
    return f"change the setting named in the message (gradient_accumulation_steps is {ga})"


def _gcd(a: int, b: int) -> int:
    import math

    return math.gcd(a, b) or 1


def _config_class() -> Any:
    """Import the installed GRPOConfig."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOConfig  # type: ignore[attr-defined]
    return GRPOConfig


def _cuda_available() -> bool:
    """Whether this process can use CUDA (torch is already imported by TRL)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken torch is another check's finding
        return False


def _devices(gpus: Any) -> list[Any]:
    """The GPUs this process can see, from an NVML snapshot (or a plain list of devices)."""
    if gpus is None:
        return []
    if isinstance(gpus, Sequence):
        return list(gpus)
    visible = getattr(gpus, "visible", None)
    devices = list(getattr(gpus, "devices", ()) or ())
    if isinstance(visible, Sequence) and not isinstance(visible, str):
        if visible and all(isinstance(i, int) for i in visible):
            return [d for i, d in enumerate(devices) if i in visible]
        return list(visible)
    return devices


def _label(device: Any) -> str:
    """A readable GPU name."""
    label = getattr(device, "label", None) or getattr(device, "name", None)
    return str(label) if label else repr(device)


def _unsloth_rewrite(values: Mapping[str, Any]) -> tuple[int, int] | None:
    """Return (old, new) batch size when unsloth would rewrite per_device_train_batch_size."""
    if values.get("generation_batch_size_set") or values.get("steps_per_generation_set"):
        return None
    bs = values.get("per_device_train_batch_size")
    ga = values.get("gradient_accumulation_steps")
    ng = values.get("num_generations")
    if not all(isinstance(v, int) and v > 0 for v in (bs, ga, ng)):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    assert isinstance(bs, int)
    assert isinstance(ga, int)
    assert isinstance(ng, int)
    if (ga * world * bs) % ng != 0:
        return bs, ng
    return None


def check_grpo_config(
    config: Mapping[str, Any] | Any,
    *,
    gpus: Any = None,
    model_max_length: int | None = None,
    unsloth: bool | None = None,
) -> ConfigReport:
    """Build the installed GRPOConfig; report every error with a fix, plus GPU/context checks."""
    if model_max_length is not None and (
        isinstance(model_max_length, bool) or not isinstance(model_max_length, int)
    ):
        raise TypeError(
            f"check_grpo_config(model_max_length={model_max_length!r}): pass the model's context "
            "length as an int (tokenizer.model_max_length or config.max_position_embeddings), "
            "or None"
        )
    cls = _config_class()
    trl_version = installed_version("trl")
    tf_version = installed_version("transformers")
    problems: list[Finding] = []
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    built: Any = config
    user: dict[str, Any] = {}
    if isinstance(config, Mapping):
        user = dict(config)
        problems += _unknown_keys(user, fields, trl_version, tf_version)
        kwargs = {k: v for k, v in user.items() if k in fields}
        typed = _wrong_types(cls, kwargs)
        problems += typed
        # With a wrong type TRL would fail on arithmetic, often naming another key: not built.
        built = None if typed else _build(cls, fields, kwargs, user, problems, unsloth, trl_version)
    values = _effective(fields, user, built)
    problems += _extra_checks(values, gpus, model_max_length, _use_unsloth(unsloth))
    return ConfigReport(tuple(problems), values, trl_version, tf_version)


def _unknown_keys(
    user: Mapping[str, Any],
    fields: Mapping[str, dataclasses.Field[Any]],
    trl_version: str | None,
    tf_version: str | None,
) -> list[Finding]:
    """An error for each key GRPOConfig does not take, with the library that removed it."""
    problems: list[Finding] = []
    for key in (k for k in user if k not in fields):
        lib, why, fix = _REMOVED.get(key, ("", "", ""))
        if not lib:
            close = difflib.get_close_matches(key, list(fields), n=1)
            why = "GRPOConfig(...) raises TypeError for an unknown keyword"
            fix = f"did you mean {close[0]!r}?" if close else "remove it"
            where = f"TRL {trl_version} / transformers {tf_version}"
        else:
            where = f"{lib} {installed_version(lib)}"
            why += ", so GRPOConfig(...) raises TypeError"
        problems.append(
            Finding(
                found=f"{key} = {user[key]!r} is not a GRPOConfig field in the installed {where}",
                why=why,
                fix=fix,
                code="unknown-key",
            )
        )
    return problems


def _build(
    cls: Any,
    fields: Mapping[str, dataclasses.Field[Any]],
    kwargs: dict[str, Any],
    user: Mapping[str, Any],
    problems: list[Finding],
    unsloth: bool | None,
    trl_version: str | None,
) -> Any:
    """``GRPOConfig(**kwargs)`` built as TRL builds it; None when it raised (reported)."""
    kwargs.setdefault("output_dir", os.path.join(tempfile.gettempdir(), "pytest-unsloth-grpo"))
    kwargs.setdefault("report_to", "none")
    substituted = False
    if not _cuda_available() and "use_cpu" not in user:
        # Validate a GPU config on a CPU machine: bf16/fp16 are checked against `gpus` later.
        kwargs["use_cpu"] = True
        substituted = True
    try:
        with warnings.catch_warnings(), _without_launcher_env():
            warnings.simplefilter("ignore")
            built = cls(**kwargs)
    except Exception as exc:  # whatever TRL raises is the finding, never our crash
        message = str(exc)
        values = _effective(fields, user, None)
        rewrite = _unsloth_rewrite(values) if _use_unsloth(unsloth) else None
        if not (rewrite and "must be divisible by num_generations" in message):
            # (otherwise unsloth rewrites the batch before TRL sees it; reported later)
            problems.append(
                Finding(
                    found=f"GRPOConfig(...) raised {type(exc).__name__}: {message}",
                    why=f"TRL {trl_version} validates the config when it is built, so "
                    "GRPOTrainer never starts",
                    fix=_fix_for(message, values),
                    code="trl-error",
                )
            )
        return None
    if substituted:
        built.use_cpu = user.get("use_cpu", False)
    return built


def _wrong_types(cls: Any, kwargs: Mapping[str, Any]) -> list[Finding]:
    """A finding for each value whose type GRPOConfig's annotation does not allow."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations in some TRL version: let TRL decide
        return []
    problems: list[Finding] = []
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is None:
            continue
        problem = _type_problem(value, hint)
        if problem:
            problems.append(
                Finding(
                    found=f"{key} = {_short(value)} is {problem}, but GRPOConfig wants "
                    f"{_hint_text(hint)}",
                    why="GRPOConfig(...) fails on it (or computes with a wrong value), often in "
                    "arithmetic that names another setting",
                    fix=f"write {key} as {_hint_text(hint)}, e.g. {key} = {_example(hint)}",
                    code="wrong-type",
                )
            )
    return problems


def _short(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "<a very large integer>"
    return text if len(text) <= 80 else text[:70] + "..."


def _type_problem(value: object, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint``, or None (unknown types pass)."""
    import math
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        whys = [_type_problem(value, arg) for arg in typing.get_args(hint)]
        return None if any(w is None for w in whys) else _kind(value)
    if origin is typing.Literal:
        return None if value in typing.get_args(hint) else _kind(value)
    if hint is Any:
        return None
    if hint is type(None):
        return None if value is None else _kind(value)
    if hint is bool:
        return None if isinstance(value, bool) else _kind(value)
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else _kind(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _kind(value)
        if isinstance(value, float) and not math.isfinite(value):
            return "not finite"
        return None
    if hint is str:
        return None if isinstance(value, str) else _kind(value)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _kind(value)
        args = typing.get_args(hint)
        if args and all(_type_problem(v, args[0]) is None for v in value):
            return None
        return None if not args else f"{_kind(value)} with an item of the wrong type"
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else _kind(value)
    if isinstance(hint, type):
        return None if isinstance(value, hint) else _kind(value)
    return None


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    for kind, name in names.items():
        if type(value) is kind:
            return name
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _hint_text(hint: Any) -> str:
    import typing

    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return f"list of {_hint_text(args[0])}" if args else "list"
    if origin is dict:
        return "dict"
    if args and origin is not typing.Literal:
        parts = [_hint_text(a) for a in args]
        return " or ".join(dict.fromkeys(parts))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) or str(hint)


def _example(hint: Any) -> str:
    import typing

    for arg in typing.get_args(hint) or (hint,):
        example = {int: "4", float: "0.5", bool: "True", str: "'text'"}.get(arg)
        if example:
            return example
    return "None"


# Under a launcher's variables TrainingArguments initialises torch.distributed, which a check
# must never do; the config is validated as one process (world size 1).
_LAUNCHER_VARS = (
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@contextlib.contextmanager
def _without_launcher_env() -> Iterator[None]:
    """Hide torchrun/accelerate variables while the config is built."""
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _use_unsloth(flag: bool | None) -> bool:
    return installed_version("unsloth") is not None if flag is None else flag


def _effective(fields: Mapping[str, Any], user: Mapping[str, Any], built: Any) -> dict[str, Any]:
    """The values TRL would use: the built config's, else the user's over the class defaults."""
    values: dict[str, Any] = {}
    for name in (
        "num_generations",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "generation_batch_size",
        "steps_per_generation",
        "max_completion_length",
        "bf16",
        "fp16",
        "use_vllm",
        "vllm_mode",
        "vllm_max_model_length",
        "use_cpu",
    ):
        if built is not None:
            values[name] = getattr(built, name, None)
        elif name in user:
            values[name] = user[name]
        elif name in fields and not isinstance(fields[name].default, dataclasses._MISSING_TYPE):
            values[name] = fields[name].default
    if built is None and values.get("bf16") is None:
        values["bf16"] = not values.get("fp16")  # TRL's default: bf16 unless fp16
    values["generation_batch_size_set"] = user.get("generation_batch_size") is not None
    values["steps_per_generation_set"] = user.get("steps_per_generation") is not None
    return values


def _extra_checks(
    values: Mapping[str, Any], gpus: Any, model_max_length: int | None, unsloth: bool
) -> list[Finding]:
    """What TRL does not check: GPU bf16, vLLM installed, unsloth's rewrite, context, launcher."""
    devices = _devices(gpus)
    problems = _bf16_problems(values, devices)
    if values.get("use_vllm") and installed_version("vllm") is None:
        problems.append(
            Finding(
                found="use_vllm = True but the vllm distribution is not installed",
                why="GRPOTrainer imports vLLM for generation and fails at construction",
                fix="pip install vllm (matching your torch), or set use_vllm = False",
                code="vllm-missing",
            )
        )
    rewrite = _unsloth_rewrite(values) if unsloth else None
    if rewrite:
        problems.append(_batch_rewrite(values, *rewrite))
    mcl = values.get("max_completion_length")
    if model_max_length is not None and isinstance(mcl, int) and mcl >= model_max_length:
        problems.append(
            Finding(
                found=f"max_completion_length {mcl} >= the model's context {model_max_length}",
                why="prompt + completion cannot fit: generation stops early or positions overflow",
                fix=f"set max_completion_length well below {model_max_length} (leave room for the "
                "prompt)",
                code="completion-beyond-context",
            )
        )
    if len(devices) > 1 and not (os.environ.get("WORLD_SIZE") or os.environ.get("LOCAL_RANK")):
        problems.append(_no_launcher(len(devices)))
    return problems


def _bf16_problems(values: Mapping[str, Any], devices: list[Any]) -> list[Finding]:
    """An error when bf16 is on for a GPU without bfloat16."""
    if not values.get("bf16") or values.get("use_cpu"):
        return []
    no_bf16 = [d for d in devices if getattr(d, "bf16", True) is False]
    if not no_bf16:
        return []
    names = ", ".join(_label(d) for d in no_bf16)
    return [
        Finding(
            found=f"bf16 = True (TRL's default) but {names} has no bfloat16 support",
            why="transformers raises 'Your setup doesn't support bf16/gpu' when the config "
            "is built on this GPU (pre-Ampere: T4, V100, P100)",
            fix="set bf16 = False and fp16 = True",
            code="bf16-unsupported",
        )
    ]


def _batch_rewrite(values: Mapping[str, Any], old: int, new: int) -> Finding:
    """Warning: unsloth silently changes per_device_train_batch_size."""
    return Finding(
        found=f"per_device_train_batch_size {old} x gradient_accumulation_steps "
        f"{values.get('gradient_accumulation_steps')} x WORLD_SIZE "
        f"{os.environ.get('WORLD_SIZE', '1')} is not a multiple of num_generations "
        f"{new}: unsloth ({installed_version('unsloth') or 'installed'}) silently sets "
        f"per_device_train_batch_size = {new}",
        why="TRL alone would raise; unsloth's patched config changes the batch, so "
        "memory use and steps per epoch differ from what the config says",
        fix=f"set per_device_train_batch_size = {new} yourself (or a batch x "
        f"gradient_accumulation_steps that divides by {new})",
        code="unsloth-batch-rewrite",
        severity="warning",
    )


def _no_launcher(count: int) -> Finding:
    """Warning: several GPUs in one process without a launcher."""
    return Finding(
        found=f"{count} GPUs are visible to one process and WORLD_SIZE/LOCAL_RANK "
        "are unset (no torchrun or accelerate launch)",
        why="one process on several GPUs makes transformers' Trainer wrap the model in "
        "nn.DataParallel, or use only the first GPU for 4-bit models; GRPO's batch "
        "arithmetic then assumes world size 1",
        fix=f"launch with accelerate launch --num_processes {count} (or torchrun), "
        "or set CUDA_VISIBLE_DEVICES to one GPU",
        code="no-launcher",
        severity="warning",
    )
