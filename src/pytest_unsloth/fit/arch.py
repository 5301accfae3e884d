"""Read a causal LM's shape from its ``config.json``: sizes, linear layers, tied embeddings, MoE.

Pure Python (no torch): a known family is read from its keys; an unknown one is counted on the
meta device by :func:`count_on_meta`, which imports transformers (the fallback the issue allows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple


class Family(NamedTuple):
    """What a model family's config leaves implicit (the transformers config classes' defaults)."""

    fused: bool  # one qkv_proj and one gate_up_proj module, like Phi-3
    qkv_bias: bool  # attention_bias default: q/k/v projections carry a bias
    tied: bool  # tie_word_embeddings default
    norms_per_layer: int


_PLAIN = Family(fused=False, qkv_bias=False, tied=False, norms_per_layer=2)
_GEMMA = Family(fused=False, qkv_bias=False, tied=True, norms_per_layer=2)
_GEMMA2 = Family(fused=False, qkv_bias=False, tied=True, norms_per_layer=4)
_QWEN2 = Family(fused=False, qkv_bias=True, tied=False, norms_per_layer=2)

FAMILIES: dict[str, Family] = {
    "llama": _PLAIN,
    "mistral": _PLAIN,
    "mixtral": _PLAIN,
    "qwen2": _QWEN2,
    "qwen2_moe": _QWEN2,
    "qwen3": _PLAIN,
    "qwen3_moe": _PLAIN,
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "phi3": Family(fused=True, qkv_bias=False, tied=False, norms_per_layer=2),
    "granite": _GEMMA,  # tied embeddings, two norms per layer
}

# The LoRA target names users write (and unsloth/peft accept) mapped onto fused Phi-3 modules.
FUSED_NAMES = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


class Linear(NamedTuple):
    """One kind of decoder linear layer."""

    name: str  # module name in a decoder layer (q_proj, shared_expert.up_proj, ...)
    in_features: int
    out_features: int
    per_layer: int  # how many a decoder layer has (the experts of an MoE layer)


@dataclasses.dataclass(frozen=True)
class Arch:
    """The numbers the memory model needs, read from one config."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]  # every kind of decoder linear layer
    norm_params: int
    bias_params: int
    experts: int = 0
    experts_per_token: int = 0
    sliding_window: int | None = None
    attention: str = "sdpa"
    known: bool = True
    norms_per_layer: int = 2
    logit_softcap: bool = False
    vision_params: int = 0  # a multimodal checkpoint's vision tower and projector (16-bit)

    @property
    def q_dim(self) -> int:
        """Width of the query projection output."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one of the key/value projection outputs."""
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers (what 4-bit/8-bit quantization touches)."""
        return self.layers * sum(m.in_features * m.out_features * m.per_layer for m in self.linears)

    @property
    def embed_params(self) -> int:
        """Input embedding plus the lm_head when it is not tied to it."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def total_params(self) -> int:
        """Every parameter of the model."""
        return (
            self.linear_params
            + self.embed_params
            + self.norm_params
            + self.bias_params
            + self.vision_params
        )


def read_config(config_or_path: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """Return a config dict from a mapping, a config.json file or a model folder."""
    if isinstance(config_or_path, Mapping):
        return dict(config_or_path)
    path = pathlib.Path(config_or_path)
    if path.is_dir():
        path = path / "config.json"
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except RecursionError:  # JSON nested deeper than Python's stack: not a config
            raise ValueError(f"{path}: config.json is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config.json is not a JSON object")
    return data


# Sizes beyond this are not a model's (and would overflow float arithmetic downstream).
SIZE_LIMIT = 2**31 - 1


def _int(cfg: Mapping[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= SIZE_LIMIT:
        raise ValueError(
            f"config key {key!r} is {_short(value)}; an integer from {minimum} to {SIZE_LIMIT} "
            "is needed"
        )
    return value


def _optional_int(cfg: Mapping[str, Any], key: str) -> int:
    """A count the config may leave out (absent, null or 0 mean none)."""
    return 0 if cfg.get(key) in (None, 0) else _int(cfg, key, minimum=0)


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config key {key!r} is {_short(value)}; true or false is needed")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def arch_from_config(config_or_path: Mapping[str, Any] | str | os.PathLike[str]) -> Arch:
    """Read the architecture numbers; unknown families are counted on the meta device."""
    raw = read_config(config_or_path)
    cfg = _language_model_config(raw)
    model_type = cfg.get("model_type", "")
    if not isinstance(model_type, str):
        raise ValueError(f"config key 'model_type' is {_short(model_type)}; a string is needed")
    family = FAMILIES.get(model_type)
    if family is None:
        return count_on_meta(cfg)
    h = _int(cfg, "hidden_size")
    layers = _int(cfg, "num_hidden_layers")
    heads = _int(cfg, "num_attention_heads")
    kv = _int(cfg, "num_key_value_heads", heads)
    head_dim = _int(cfg, "head_dim") if cfg.get("head_dim") is not None else h // heads
    if head_dim < 1:
        raise ValueError(f"hidden_size {h} over num_attention_heads {heads} leaves no head_dim")
    vocab = _int(cfg, "vocab_size")
    experts = _optional_int(cfg, "num_local_experts") or _optional_int(cfg, "num_experts")
    inter = _optional_int(cfg, "moe_intermediate_size") if experts else 0
    inter = inter or _int(cfg, "intermediate_size")
    q, kvd = heads * head_dim, kv * head_dim
    bias = _flag(cfg, "attention_bias", family.qkv_bias)
    norm_params = layers * family.norms_per_layer * h + h
    if model_type.startswith("qwen3") or model_type == "gemma3_text" or model_type == "gemma3":
        norm_params += layers * 2 * head_dim  # q_norm / k_norm
    window = cfg.get("sliding_window")
    # Gemma 2 caps its logits (divide, tanh, multiply: more vocab-sized buffers); transformers'
    # Gemma2Config defaults final_logit_softcapping to 30.0, so a config without the key has it.
    softcap = cfg.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None)
    return Arch(
        model_type=model_type,
        hidden=h,
        intermediate=inter,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        vocab=vocab,
        tied=_flag(cfg, "tie_word_embeddings", family.tied),
        linears=tuple(_linear_layers(cfg, family.fused, h, q, kvd, inter, experts)),
        norm_params=norm_params,
        bias_params=layers * (q + 2 * kvd) if bias else 0,
        experts=experts,
        experts_per_token=_optional_int(cfg, "num_experts_per_tok"),
        sliding_window=window if isinstance(window, int) and not isinstance(window, bool) else None,
        attention="eager" if model_type == "gemma2" else "sdpa",
        norms_per_layer=family.norms_per_layer,
        logit_softcap=softcap is not None,
        vision_params=_vision_params(raw, h),
    )


# transformers' SiglipVisionConfig defaults, for keys a vision_config leaves out
_SIGLIP = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
}


def _vision_params(raw: Mapping[str, Any], text_hidden: int) -> int:
    """Parameters of a SigLIP vision tower and Gemma 3's projector (Gemma 3 4B/12B/27B)."""
    vc = raw.get("vision_config")
    if not (isinstance(vc, Mapping) and vc.get("model_type") == "siglip_vision_model"):
        return 0
    try:
        return _siglip_params(vc, text_hidden, raw.get("model_type") == "gemma3")
    except ValueError as exc:
        raise ValueError(f"vision_config: {exc}") from None


def _siglip_params(vc: Mapping[str, Any], text_hidden: int, gemma3: bool) -> int:
    v = {**_SIGLIP, **{k: vc[k] for k in _SIGLIP if vc.get(k) is not None}}
    h, inter, layers = (
        _int(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")
    )
    patch = _int(v, "patch_size")
    mlp = 2 * h * inter + inter + h
    per_layer = 4 * (h * h + h) + mlp + 4 * h  # q/k/v/out with biases, fc1/fc2, two LayerNorms
    embed = (
        _int(v, "num_channels") * patch * patch * h + h + (_int(v, "image_size") // patch) ** 2 * h
    )
    total = layers * per_layer + embed + 2 * h  # + post_layernorm
    if _flag(vc, "vision_use_head", True):  # attention-pooling head
        total += h + 3 * h * h + 3 * h + h * h + h + 2 * h + mlp
    if gemma3:  # mm_input_projection and its RMSNorm
        total += h * text_hidden + h
    return total


def _language_model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: multimodal wrappers (Gemma 3, Llama 4, ...) nest it."""
    text = cfg.get("text_config")
    if not (isinstance(text, Mapping) and "hidden_size" in text):
        return cfg
    outer_tie = cfg.get("tie_word_embeddings")
    inner = {**text, **({"tie_word_embeddings": outer_tie} if outer_tie is not None else {})}
    inner.setdefault("model_type", "gemma3_text")
    return inner


def _linear_layers(
    cfg: Mapping[str, Any], fused: bool, h: int, q: int, kvd: int, inter: int, experts: int
) -> list[Linear]:
    """Each kind of decoder linear layer, with its sizes."""
    if fused:
        return [
            Linear("qkv_proj", h, q + 2 * kvd, 1),
            Linear("o_proj", q, h, 1),
            Linear("gate_up_proj", h, 2 * inter, 1),
            Linear("down_proj", inter, h, 1),
        ]
    mlp_n = experts or 1
    lin = [
        Linear("q_proj", h, q, 1),
        Linear("k_proj", h, kvd, 1),
        Linear("v_proj", h, kvd, 1),
        Linear("o_proj", q, h, 1),
        Linear("gate_proj", h, inter, mlp_n),
        Linear("up_proj", h, inter, mlp_n),
        Linear("down_proj", inter, h, mlp_n),
    ]
    if experts:
        lin.append(Linear("router", h, experts, 1))
        shared = _optional_int(cfg, "shared_expert_intermediate_size")
        if shared:
            lin += [
                Linear("shared_expert.gate_proj", h, shared, 1),
                Linear("shared_expert.up_proj", h, shared, 1),
                Linear("shared_expert.down_proj", shared, h, 1),
                Linear("shared_expert_gate", h, 1, 1),  # Qwen2-MoE scales the shared expert
            ]
    return lin


def count_on_meta(cfg: Mapping[str, Any]) -> Arch:
    """Build an unknown family on the meta device and read its linear layers (imports torch)."""
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - the ML stack is what the plugin checks
        raise ValueError(
            f"model_type {cfg.get('model_type')!r} is not a known family and counting it "
            f"needs transformers and torch: {exc}"
        ) from exc
    model_type = cfg.get("model_type")
    if not model_type:
        raise ValueError("config.json has no model_type, so the architecture is unknown")
    try:
        config = transformers.AutoConfig.for_model(**dict(cfg))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except Exception as exc:  # whatever transformers raises for a config it cannot build
        raise ValueError(
            f"model_type {model_type!r} is not a family the estimator knows, and transformers "
            f"{transformers.__version__} could not build it from the config: "
            f"{type(exc).__name__}: {_short(str(exc))}"
        ) from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(text.hidden_size)
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    vocab = int(text.vocab_size)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    per_layer: dict[str, tuple[int, int, int]] = {}
    linear_total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not out:
            short = name.rsplit(".", 1)[-1]
            i, o, n = per_layer.get(short, (mod.in_features, mod.out_features, 0))
            per_layer[short] = (i, o, n + 1)
            linear_total += mod.in_features * mod.out_features
    lin = tuple(Linear(k, i, o, max(1, n // layers)) for k, (i, o, n) in per_layer.items())
    total = sum(p.numel() for p in model.parameters())
    emb_total = vocab * h * (1 if tied else 2)
    inter = int(getattr(text, "intermediate_size", 4 * h) or 4 * h)
    return Arch(
        model_type=str(cfg.get("model_type", "")),
        hidden=h,
        intermediate=inter,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        vocab=vocab,
        tied=tied,
        linears=lin,
        norm_params=max(0, total - linear_total - emb_total),
        bias_params=0,
        known=False,
    )


def lora_modules(arch: Arch, targets: str | list[str] | tuple[str, ...] | None) -> list[Linear]:
    """The decoder linear layers a LoRA target list hits ("all-linear"/None: all but a router)."""
    if targets is None or targets == "all-linear":
        return [m for m in arch.linears if m.name != "router"]
    names = [targets] if isinstance(targets, str) else list(targets)
    wanted = set(names) | {FUSED_NAMES[n] for n in names if n in FUSED_NAMES}
    return [m for m in arch.linears if m.name in wanted or m.name.rsplit(".", 1)[-1] in wanted]
