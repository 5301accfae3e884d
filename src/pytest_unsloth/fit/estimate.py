"""Peak GPU memory of one LoRA/QLoRA (or full) fine-tuning step, from config.json alone.

The peak of a step is what stays on the card (CUDA context, weights, adapters, their gradients
and optimizer states) plus the largest transient of the step's phases: the training
forward/backward (activations and the logits/loss buffers), GRPO's ``generate`` (KV cache) and the
reference pass, plus what the caching allocator holds beyond the live tensors. Byte counts of
weights, adapters and optimizer states are exact arithmetic; activation and logits coefficients
are bytes per element calibrated on measured peaks (``tests/data/fit_grid.jsonl``: 40 points on
an H200 under expandable segments, torch 2.11, transformers 5.17, peft 0.21, unsloth 2026.10.9;
``docs/gpu-runs/2026-11-30/session3/`` has the run) and checked on points measured after the fit
(``tests/data/fit_heldout.jsonl``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from pytest_unsloth.fit import vllm as vllm_sizing
from pytest_unsloth.fit.arch import Arch, arch_from_config, lora_modules
from pytest_unsloth.util.units import GIB, MIB

DTYPE_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "bf16": 2,
    "fp16": 2,
    "fp32": 4,
    "auto": 2,
}
GC_MODES = ("unsloth", "true", "false")
STACKS = ("unsloth", "transformers")
TASKS = ("sft", "grpo")
OPTIMIZERS = {
    # bytes of optimizer state per trainable parameter for fp32 parameters
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adamw_hf": 8,
    "adamw": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "adamw_bnb_8bit": 2,
    "sgd": 0,
    "adafactor": 4,
}
PART_ORDER = (
    "cuda_context",
    "weights",
    "lora_adapters",
    "gradients",
    "optimizer",
    "activations",
    "logits",
    "generation",
    "reference",
    "allocator",
    "vllm",
)


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Bytes per element of the transient buffers, calibrated on the measured grid."""

    # saved activations per token per decoder layer (no checkpointing, plain transformers+peft)
    act_hidden: float = 8.0
    act_q: float = 14.796
    act_kv: float = 4.0
    act_inter: float = 7.94
    # eager attention: bytes per score (heads x seq per token per layer): the bf16 scores, the
    # soft-capped copy and the fp32 softmax. Was fitted to 170 on gemma-2 points with
    # checkpointing, where it stood in for the logit cap below; a held-out gemma-2 point without
    # checkpointing then came out 4x over (2026-11-30), so it is set from the buffers instead.
    act_eager_scores: float = 8.0
    # checkpointing: the per-layer input kept (2 bytes x hidden) times this, plus this many
    # layers' worth of full activations alive during one layer's recompute and backward
    ckpt_kept: float = 1.294
    ckpt_live_layers: float = 0.5
    unsloth_ckpt_kept: float = 0.0
    unsloth_live_layers: float = 2.144
    unsloth_act_scale: float = 0.649
    # logits/loss buffers per (token x vocab) element
    logits_sft: float = 14.898
    logits_grpo: float = 5.821
    unsloth_logits_sft: float = 0.271
    unsloth_logits_grpo: float = 5.722
    logits_ref: float = 7.21
    # GRPO's per-token log-probs (TRL's selective_log_softmax) loop over the rows of a bf16
    # batch: one completion row's log-softmax temporaries are alive at a time, bytes per logit
    # of that row; they count once, however many rows the batch has
    logits_row: float = 4.067
    logits_softcap: float = 3.0  # final_logit_softcapping's extra buffers per logit
    # reserved beyond allocated, as a share of the step's transient: small, because the peaks
    # are measured with expandable segments (unsloth_zoo turns them on at import), where the
    # allocator keeps no outgrown blocks; see "What is measured" in the README
    allocator: float = 0.031
    # CUDA context + cuBLAS/cuDNN workspaces, as NVML shows beyond torch's reserved memory
    context_bytes: int = 758 * MIB
    # memory outside torch's pool that grows with generate's length: 758 MiB + 0.089 MiB per
    # completion token fits the NVML figures of all GRPO points (772 MiB at 128 tokens, 938 at 2048)
    grpo_context_per_token: int = 91 * 1024
    unsloth_4bit_context_bytes: int = 70 * MIB  # unsloth's 4-bit kernels


COEFFICIENTS = Coefficients()


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """A peak-memory estimate in bytes, by part, with the settings it was computed for."""

    parts: dict[str, int]
    settings: dict[str, Any]
    phases: dict[str, int]
    model_type: str
    params: int
    trainable_params: int
    vllm: vllm_sizing.VllmBudget | None = None
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        """The estimated peak, every part included."""
        return sum(self.parts.values())

    @property
    def biggest_part(self) -> str:
        """Name of the largest part."""
        return max(self.parts, key=lambda k: self.parts[k])

    def gib(self, part: str | None = None) -> float:
        """A part (or the total) in GiB."""
        return (self.total_bytes if part is None else self.parts[part]) / GIB

    def summary(self, limit: int = 4) -> str:
        """`weights 4.1, activations 19.0, ...` for the largest parts, in GiB."""
        ranked = sorted(((v, k) for k, v in self.parts.items() if v > 0), reverse=True)
        return ", ".join(f"{k} {v / GIB:.1f}" for v, k in ranked[:limit])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: total_bytes, parts (name -> bytes), settings, phases."""
        out: dict[str, Any] = {
            "total_bytes": self.total_bytes,
            "parts": dict(self.parts),
            "model_type": self.model_type,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "phases": dict(self.phases),
            "settings": dict(self.settings),
            "notes": list(self.notes),
        }
        if self.vllm is not None:
            out["vllm"] = dataclasses.asdict(self.vllm)
        return out


# Every setting estimate_memory understands, with its default; names follow the ini keys and
# from_pretrained / get_peft_model / GRPOConfig arguments.
DEFAULTS: dict[str, Any] = {
    "task": "sft",
    "stack": "unsloth",
    "load_in_4bit": True,
    "load_in_8bit": False,
    "full_finetuning": False,
    "dtype": "bfloat16",
    "bnb_4bit_use_double_quant": True,
    "lora_r": 16,
    "target_modules": "all-linear",
    "optim": "adamw_8bit",
    "use_gradient_checkpointing": "unsloth",
    "per_device_train_batch_size": None,  # SFT: 1; GRPO: num_generations
    "max_seq_length": 2048,
    "num_generations": 8,
    "max_completion_length": 512,
    "max_prompt_length": 256,
    "beta": 0.0,
    "fast_inference": False,
    "gpu_memory_utilization": 0.5,
    "gpu_total_memory": None,  # bytes; needed for the vLLM reservation
    "max_lora_rank": None,
}
ALIASES = {
    "gradient_checkpointing": "use_gradient_checkpointing",
    "r": "lora_r",
    "use_vllm": "fast_inference",
    "lora_target_modules": "target_modules",
    "batch_size": "per_device_train_batch_size",
    "vllm_gpu_memory_utilization": "gpu_memory_utilization",
}


def normalize_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Apply aliases and defaults, validating every value; unknown names are a ValueError."""
    out = dict(DEFAULTS)
    for key, value in settings.items():
        name = ALIASES.get(key, key)
        if name not in DEFAULTS:
            raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(DEFAULTS))}")
        out[name] = value
    gc = out["use_gradient_checkpointing"]
    gc_text = str(gc).strip().lower()
    gc_text = {
        "1": "true",
        "0": "false",
        "off": "false",
        "none": "false",
        "on": "true",
        "yes": "true",
        "no": "false",
    }.get(gc_text, gc_text)
    if gc_text not in GC_MODES:
        raise ValueError(f"use_gradient_checkpointing={gc!r}; use 'unsloth', True or False")
    out["use_gradient_checkpointing"] = gc_text
    for key, allowed in (("task", TASKS), ("stack", STACKS)):
        if str(out[key]).lower() not in allowed:
            raise ValueError(f"{key}={out[key]!r}; use one of {', '.join(allowed)}")
        out[key] = str(out[key]).lower()
    if str(out["dtype"]).lower() not in DTYPE_BYTES:
        raise ValueError(f"dtype={out['dtype']!r}; use bfloat16, float16 or float32")
    if str(out["optim"]).lower() not in OPTIMIZERS:
        raise ValueError(f"optim={out['optim']!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    for key in (
        "load_in_4bit",
        "load_in_8bit",
        "full_finetuning",
        "fast_inference",
        "bnb_4bit_use_double_quant",
    ):
        out[key] = _bool(key, out[key])
    for key in ("lora_r", "max_seq_length", "num_generations", "max_completion_length"):
        out[key] = _positive_int(key, out[key])
    out["max_prompt_length"] = _positive_int("max_prompt_length", out["max_prompt_length"], 0)
    if out["per_device_train_batch_size"] is not None:
        out["per_device_train_batch_size"] = _positive_int(
            "per_device_train_batch_size", out["per_device_train_batch_size"]
        )
    if out["max_lora_rank"] is not None:
        out["max_lora_rank"] = _positive_int("max_lora_rank", out["max_lora_rank"])
    out["target_modules"] = _targets(out["target_modules"])
    out["beta"] = _number("beta", out["beta"])
    if isinstance(out["gpu_total_memory"], str):
        from pytest_unsloth.settings import parse_amount_bytes

        out["gpu_total_memory"] = parse_amount_bytes(out["gpu_total_memory"])
    if out["gpu_total_memory"] is not None:
        out["gpu_total_memory"] = _positive_int(
            "gpu_total_memory", out["gpu_total_memory"], 0, 2**60
        )
    util = _number("gpu_memory_utilization", out["gpu_memory_utilization"])
    if not 0 < util <= 1:
        raise ValueError(f"gpu_memory_utilization={util!r} must be in (0, 1]")
    out["gpu_memory_utilization"] = util
    if out["load_in_4bit"] and out["load_in_8bit"]:
        raise ValueError("load_in_4bit and load_in_8bit are both set; choose one")
    return out


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "none", ""):
        return False
    raise ValueError(f"{key}={value!r} is not a boolean")


def _positive_int(key: str, value: Any, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    try:
        number = int(value)
        whole = float(value) == number
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key}={value!r} is not an integer") from None
    if not minimum <= number <= maximum or isinstance(value, bool) or not whole:
        raise ValueError(f"{key}={value!r} must be an integer from {minimum} to {maximum}")
    return number


def _number(key: str, value: Any) -> float:
    """A finite, non-negative number."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key}={value!r} is not a number") from None
    if isinstance(value, bool) or not 0 <= number < float("inf"):
        raise ValueError(f"{key}={value!r} must be a finite number >= 0")
    return number


def _targets(value: Any) -> str | list[str]:
    """LoRA target modules: "all-linear", one name, or a list of names."""
    if value is None:
        return "all-linear"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        f"target_modules={value!r} must be 'all-linear', a module name or a list of names"
    )


def weight_bytes(arch: Arch, s: Mapping[str, Any]) -> int:
    """Bytes of the model's weights as loaded (16-bit, NF4 with absmax, or int8 with scales)."""
    dt = DTYPE_BYTES[str(s["dtype"]).lower()]
    n_lin = arch.linear_params
    rest = arch.embed_params + arch.norm_params + arch.bias_params + arch.vision_params  # 16-bit
    if s["load_in_4bit"] and not s["full_finetuning"]:
        # bitsandbytes NF4: two 4-bit codes per byte; one absmax per 64-element block, fp32, or
        # with double quantization uint8 plus one fp32 absmax (and offset) per 256 blocks
        blocks = n_lin / 64
        absmax = blocks * (1 + 8 / 256) if s["bnb_4bit_use_double_quant"] else blocks * 4
        n_tensors = arch.layers * sum(m.per_layer for m in arch.linears)
        return int(n_lin / 2 + absmax + n_tensors * 1024 + rest * dt)
    if s["load_in_8bit"] and not s["full_finetuning"]:
        rows = arch.layers * sum(m.out_features * m.per_layer for m in arch.linears)
        return int(n_lin + rows * 4 + rest * dt)
    return int((n_lin + rest) * dt)


def lora_params(arch: Arch, s: Mapping[str, Any]) -> int:
    """Trainable LoRA parameters: r x (in + out) for each targeted linear layer."""
    r = int(s["lora_r"])
    return arch.layers * sum(
        r * (m.in_features + m.out_features) * m.per_layer
        for m in lora_modules(arch, s["target_modules"])
    )


def _layer_token_bytes(arch: Arch, seq: int, c: Coefficients) -> float:
    """Saved activations per token of one decoder layer, no checkpointing."""
    inter = arch.intermediate * max(1, arch.experts_per_token)
    # each RMSNorm keeps an fp32 copy of its input: Gemma's four norms per layer cost twice
    per = (
        c.act_hidden * arch.hidden * arch.norms_per_layer / 2
        + c.act_q * arch.q_dim
        + c.act_kv * arch.kv_dim
        + c.act_inter * inter
    )
    if arch.attention == "eager":
        per += c.act_eager_scores * arch.heads * seq
    return per


def training_transient(
    arch: Arch, s: Mapping[str, Any], tokens: int, seq: int, step: _Step, c: Coefficients
) -> tuple[float, float]:
    """(activations, logits) bytes of one training forward+backward."""
    per = _layer_token_bytes(arch, seq, c)
    unsloth = s["stack"] == "unsloth"
    if unsloth:
        per *= c.unsloth_act_scale
    gc = s["use_gradient_checkpointing"]
    kept_token = 2 * arch.hidden * arch.layers
    if gc == "false":
        act = arch.layers * tokens * per
    elif gc == "unsloth" and unsloth:
        act = tokens * (c.unsloth_ckpt_kept * kept_token + c.unsloth_live_layers * per)
    else:
        # HF non-reentrant checkpointing (also what "unsloth" means without unsloth)
        live = c.unsloth_live_layers if unsloth else c.ckpt_live_layers
        act = tokens * (c.ckpt_kept * kept_token + live * per)
    if s["task"] == "sft":
        coeff = c.unsloth_logits_sft if unsloth else c.logits_sft
    else:
        coeff = c.unsloth_logits_grpo if unsloth else c.logits_grpo
    if arch.logit_softcap and not unsloth:
        coeff += c.logits_softcap
    return act, step.logit_rows * arch.vocab * coeff + _row_bytes(arch, s, step, c)


def _row_bytes(arch: Arch, s: Mapping[str, Any], step: _Step, c: Coefficients) -> float:
    """GRPO: the one completion row whose log-softmax temporaries are alive at a time."""
    if s["task"] != "grpo":
        return 0.0
    return (step.logit_rows // max(1, step.batch)) * arch.vocab * c.logits_row


class _Step(NamedTuple):
    """The shape of one training step."""

    batch: int  # sequences per device
    seq: int  # tokens per sequence (prompt + completion for GRPO)
    logit_rows: int  # rows of the logits tensor the loss needs


def _step_shape(s: Mapping[str, Any]) -> _Step:
    """Batch, sequence length and logit rows of one step, as TRL runs it."""
    if s["task"] == "grpo":
        batch = s["per_device_train_batch_size"] or s["num_generations"]
        completion = s["max_completion_length"]
        seq = s["max_prompt_length"] + completion
        return _Step(batch, seq, batch * (completion + 1))  # TRL: logits_to_keep = completion + 1
    batch = s["per_device_train_batch_size"] or 1
    return _Step(batch, s["max_seq_length"], batch * s["max_seq_length"])


def estimate_memory(
    config_or_path: Mapping[str, Any] | str | os.PathLike[str],
    coefficients: Coefficients | None = None,
    **settings: Any,
) -> MemoryEstimate:
    """Estimate the peak GPU memory of one training step; settings as the ini/trainer names."""
    c = coefficients or COEFFICIENTS
    arch = arch_from_config(config_or_path)
    s = normalize_settings(settings)
    notes: list[str] = []
    grpo = s["task"] == "grpo"
    step = _step_shape(s)
    weights = weight_bytes(arch, s)
    parts = dict.fromkeys(PART_ORDER, 0)
    parts["weights"] = weights
    parts["cuda_context"] = (
        c.context_bytes
        + (c.grpo_context_per_token * s["max_completion_length"] if grpo else 0)
        + (c.unsloth_4bit_context_bytes if s["stack"] == "unsloth" and s["load_in_4bit"] else 0)
    )
    trainable = _count_trainable(arch, s, parts, notes)
    act, logits = training_transient(arch, s, step.batch * step.seq, step.seq, step, c)
    phases = {"train": int(act + logits)}
    if grpo:
        phases.update(_grpo_phases(arch, s, step, c, parts, weights, notes))
    peak_phase = max(phases, key=lambda k: phases[k])
    transient = phases[peak_phase]
    if peak_phase == "train":
        parts["activations"], parts["logits"] = int(act), int(logits)
    else:
        parts["activations"], parts["logits"] = 0, 0
        parts["generation" if peak_phase == "generate" else "reference"] = transient
    parts["allocator"] = int(c.allocator * transient)
    budget = None
    if s["fast_inference"]:
        budget = vllm_sizing.budget(arch, s, weights)
        parts["vllm"] = budget.reserved_bytes
        notes.extend(budget.notes)
    return MemoryEstimate(
        parts=parts,
        settings=s,
        phases=phases,
        model_type=arch.model_type,
        params=arch.total_params,
        trainable_params=trainable,
        vllm=budget,
        notes=tuple(notes),
    )


def _count_trainable(
    arch: Arch, s: Mapping[str, Any], parts: dict[str, int], notes: list[str]
) -> int:
    """Fill in adapters, gradients and optimizer states; return the trainable parameters."""
    optim = str(s["optim"]).lower()
    if s["full_finetuning"]:
        dt = DTYPE_BYTES[str(s["dtype"]).lower()]
        trainable = arch.total_params
        parts["gradients"] = trainable * dt
        # torch optimizers keep states in the parameters' dtype; 8-bit ones one byte each
        per_state = OPTIMIZERS[optim] / 8 * 2 * dt if OPTIMIZERS[optim] == 8 else OPTIMIZERS[optim]
        parts["optimizer"] = int(trainable * per_state)
    else:
        trainable = lora_params(arch, s)
        parts["lora_adapters"] = trainable * 4  # peft keeps adapters in fp32 under bf16
        parts["gradients"] = trainable * 4
        parts["optimizer"] = trainable * OPTIMIZERS[optim]
    if optim.startswith("paged"):
        notes.append("paged optimizer states are counted on the GPU; under pressure they page out")
    return trainable


def _grpo_phases(
    arch: Arch,
    s: Mapping[str, Any],
    step: _Step,
    c: Coefficients,
    parts: dict[str, int],
    weights: int,
    notes: list[str],
) -> dict[str, int]:
    """The GRPO phases besides the training step: generation, and the reference model's pass."""
    gen_batch = s["num_generations"] * max(1, step.batch // s["num_generations"])
    kv = gen_batch * step.seq * arch.layers * 2 * arch.kv_dim * 2
    phases = {"generate": int(kv + gen_batch * arch.vocab * 4 * 2)}
    if s["beta"] > 0:
        ref = step.logit_rows * arch.vocab * c.logits_ref + _row_bytes(arch, s, step, c)
        phases["reference"] = int(ref)
        if s["full_finetuning"]:
            parts["weights"] += weights  # a second, frozen copy of the model
            notes.append("beta > 0 with full fine-tuning loads a reference model copy")
    return phases


def accelerate_style(
    config_or_path: Mapping[str, Any] | str | os.PathLike[str], **settings: Any
) -> int:
    """What `accelerate estimate-memory` would say: weights, and for training an Adam x4 rule."""
    arch = arch_from_config(config_or_path)
    s = normalize_settings(settings)
    # accelerate: model size in the load dtype (int4 = 1/2 byte per parameter); training
    # "with Adam" is 4x the fp32-equivalent size of the trainable model (here: the adapters)
    size = arch.total_params * (0.5 if s["load_in_4bit"] else 2)
    trainable = arch.total_params if s["full_finetuning"] else lora_params(arch, s)
    return int(size + 4 * 4 * trainable)
