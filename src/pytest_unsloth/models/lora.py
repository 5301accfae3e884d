"""LoRA adapters on a shared 4-bit model: add them, verify they train, take them off again.

The base model comes from :mod:`pytest_unsloth.models.loader` and is shared between tests, so adding
adapters is paired with removing them and checking the base is back as it was
(:func:`snapshot_state`). unsloth's ``get_peft_model`` on the unsloth backend, peft's otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from pytest_unsloth.models.loader import LoadedModel, ModelCheckError, cpu_packed_layers

__all__ = [
    "GRADIENT_CHECKPOINTING_MODES",
    "AppliedLora",
    "LoraSettings",
    "ModelState",
    "apply_lora",
    "checkpointing_enabled",
    "describe_state_change",
    "match_target_modules",
    "remove_lora",
    "set_checkpointing",
    "snapshot_state",
    "verify_lora",
]

GRADIENT_CHECKPOINTING_MODES = ("unsloth", "true", "false")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; defaults match the plugin's settings defaults."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    gradient_checkpointing: str = "unsloth"
    seed: int = 3407


@dataclasses.dataclass(eq=False)
class AppliedLora:
    """A PEFT model on top of a cached base, with what is needed to take the adapters off."""

    model: Any
    base: LoadedModel
    settings: LoraSettings
    lora_layers: int
    lora_tensors: int
    trainable_parameters: int
    gradient_checkpointing: str
    state_before: ModelState

    def describe(self) -> str:
        """One line: adapter layout and gradient checkpointing mode."""
        targets = ", ".join(self.settings.target_modules)
        return (
            f"LoRA r={self.settings.r} alpha={self.settings.alpha} "
            f"dropout={self.settings.dropout} on {targets}: {self.lora_layers} layers, "
            f"{self.lora_tensors} LoRA tensors, {self.trainable_parameters} trainable parameters, "
            f"gradient checkpointing {self.gradient_checkpointing}"
        )


# ----------------------------------------------------------------------------- state snapshots


def checkpointing_enabled(model: Any) -> bool:
    """Return whether activation (gradient) checkpointing is on, under either transformers name."""
    # transformers 5.23 renamed gradient_* to activation_* and warns on the old names; older
    # releases (5.17 on the GPU machine) only have the old ones.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def set_checkpointing(model: Any, enabled: bool) -> None:
    """Switch activation checkpointing on (non-reentrant) or off, under either transformers name."""
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


class ModelState(NamedTuple):
    """What a test could change on a shared model (a snapshot, compared with ``==``)."""

    modules: tuple[tuple[str, str], ...]  # (name, type name) of every module
    requires_grad: tuple[tuple[str, bool], ...]  # (name, requires_grad) of every parameter
    training: bool
    checkpointing: bool
    has_peft_config: bool


def snapshot_state(model: Any) -> ModelState:
    """Capture what a test could change on a shared model: modules, requires_grad, modes."""
    return ModelState(
        modules=tuple((name, type(m).__name__) for name, m in model.named_modules()),
        requires_grad=tuple((name, bool(p.requires_grad)) for name, p in model.named_parameters()),
        training=bool(model.training),
        checkpointing=checkpointing_enabled(model),
        has_peft_config=hasattr(model, "peft_config"),
    )


def describe_state_change(before: tuple[Any, ...], after: tuple[Any, ...]) -> str:
    """Say in a few words what changed between two snapshots (``ModelState`` or plain tuples)."""
    old, new = ModelState(*before), ModelState(*after)
    changes: list[str] = []
    if old.modules != new.modules:
        added = sorted({t for _, t in new.modules} - {t for _, t in old.modules})
        changes.append(
            "modules replaced" + (f" (new types: {', '.join(added[:4])})" if added else "")
        )
    if old.requires_grad != new.requires_grad:
        pairs = zip(old.requires_grad, new.requires_grad, strict=False)
        flipped = [n for (n, g), (_, h) in pairs if g != h]
        changes.append(f"requires_grad changed on {len(flipped) or 'some'} parameters")
    if old.training != new.training:
        changes.append("train/eval mode changed")
    if old.checkpointing != new.checkpointing:
        changes.append("gradient checkpointing switched")
    if old.has_peft_config != new.has_peft_config:
        changes.append("peft_config added")
    return "; ".join(changes) or "no change"


# ----------------------------------------------------------------------------- LoRA


def _linear_leaf_names(model: Any) -> dict[str, list[str]]:
    """Map each Linear layer's last name component to the full names that end with it."""
    import torch

    leaves: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name:
            leaves.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return leaves


def match_target_modules(model: Any, targets: Sequence[str]) -> dict[str, list[str]]:
    """Return, per target, the modules peft would wrap; fail naming targets that match none."""
    if not targets:
        raise ModelCheckError("no LoRA target modules given; name at least one (e.g. q_proj)")
    modules = dict(model.named_modules())
    leaves = _linear_leaf_names(model)
    if tuple(targets) == ("all-linear",):
        # peft's all-linear: every Linear except the output head.
        output = model.get_output_embeddings()
        return {
            leaf: names
            for leaf, names in leaves.items()
            if not any(modules[n] is output for n in names)
        }
    matched: dict[str, list[str]] = {}
    missing: list[str] = []
    for target in targets:
        # peft's rule: the full name equals the target or ends with "." + target.
        names = [n for n in modules if n and (n == target or n.endswith("." + target))]
        if names:
            matched[target] = names
        else:
            missing.append(target)
    if missing:
        close = {t: _close_match(t, leaves) for t in missing}
        hint = "; ".join(f"{t!r} -> did you mean {c!r}?" for t, c in close.items() if c)
        raise ModelCheckError(
            f"LoRA target module{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(t) for t in missing)} matched no module of "
            f"{type(model).__name__}, so no adapter would be trained there. "
            f"Linear modules that exist: {', '.join(sorted(leaves))}. "
            + (hint + ". " if hint else "")
            + "Fix the names in --unsloth-lora-target-modules / ini unsloth_lora_target_modules"
        )
    return matched


def _close_match(target: str, leaves: Mapping[str, object]) -> str | None:
    """Return the existing leaf name closest to a typo'd target, if any is close."""
    import difflib

    found = difflib.get_close_matches(target, list(leaves), n=1, cutoff=0.6)
    return found[0] if found else None


def _lora_layer_names(model: Any) -> list[str]:
    """Return the names of modules that carry LoRA adapters (peft LoraLayer)."""
    from peft.tuners.lora import LoraLayer

    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _strip_peft_prefix(name: str) -> str:
    """Turn 'base_model.model.model.layers.0.q_proj' into the base model's module name."""
    return name.removeprefix("base_model.model.")


def apply_lora(loaded: LoadedModel, settings: LoraSettings) -> AppliedLora:
    """Add LoRA adapters to a loaded model (unsloth's or peft's get_peft_model) and verify them."""
    if loaded.released or loaded.model is None:
        raise ModelCheckError("cannot add LoRA adapters: the model was already released")
    _check_settings(settings)
    base = loaded.model
    _check_base(base)
    matched = match_target_modules(base, settings.target_modules)
    state = snapshot_state(base)
    if loaded.backend == "unsloth":
        peft_model, used_mode = _unsloth_peft_model(base, settings, list(matched))
    else:
        peft_model, used_mode = _peft_model(base, settings, list(matched))
    applied = AppliedLora(
        model=peft_model,
        base=loaded,
        settings=settings,
        lora_layers=0,
        lora_tensors=0,
        trainable_parameters=0,
        gradient_checkpointing=used_mode,
        state_before=state,
    )
    try:
        verify_lora(applied, matched)
    except ModelCheckError:
        remove_lora(applied)
        raise
    return applied


def _check_settings(settings: LoraSettings) -> None:
    """Raise ModelCheckError for a LoRA setting no backend accepts."""
    if settings.gradient_checkpointing not in GRADIENT_CHECKPOINTING_MODES:
        raise ModelCheckError(
            f"unknown gradient checkpointing mode {settings.gradient_checkpointing!r}; choose "
            f"one of {', '.join(GRADIENT_CHECKPOINTING_MODES)}"
        )
    if settings.r <= 0:
        raise ModelCheckError(f"LoRA r must be positive, got {settings.r}")
    if not 0.0 <= settings.dropout < 1.0:
        raise ModelCheckError(f"LoRA dropout must be in [0, 1), got {settings.dropout}")


def _check_base(base: Any) -> None:
    """Raise ModelCheckError when the base model cannot take fresh, trainable adapters."""
    if _lora_layer_names(base):
        raise ModelCheckError(
            "the shared 4-bit model already carries LoRA adapters; another fixture or test "
            "added them and did not remove them"
        )
    packed = cpu_packed_layers(base)
    if packed:
        raise ModelCheckError(
            f"{len(packed)} 4-bit layers (e.g. {packed[0]}) were repacked by bitsandbytes for CPU "
            "inference (an eval-mode forward without grad on an AVX512-BF16 CPU); backward through "
            "them is not implemented, so LoRA training would silently get no gradient there. "
            "Fix: load a fresh model, or set support_avx512bf16_for_cpu = False on its Linear4bit "
            "layers before any inference (pytest_unsloth.models.loader.keep_cpu_layout_trainable)"
        )


def _unsloth_peft_model(base: Any, settings: LoraSettings, targets: list[str]) -> tuple[Any, str]:
    """unsloth's get_peft_model, and the gradient checkpointing mode it used."""
    from unsloth import FastLanguageModel

    mode: Any = {"unsloth": "unsloth", "true": True, "false": False}[
        settings.gradient_checkpointing
    ]
    peft_model = FastLanguageModel.get_peft_model(
        base,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        use_gradient_checkpointing=mode,
        random_state=settings.seed,
    )
    return peft_model, settings.gradient_checkpointing


def _peft_model(base: Any, settings: LoraSettings, targets: list[str]) -> tuple[Any, str]:
    """peft's get_peft_model with transformers' checkpointing, and the mode it used."""
    import peft
    import torch

    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Seed only the adapter init (lora_A is random) without disturbing the test's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        peft_model = peft.get_peft_model(base, config)
    if settings.gradient_checkpointing == "false":
        return peft_model, "off"
    # "unsloth" mode exists only in unsloth; transformers' own checkpointing is the nearest
    # equivalent (non-reentrant, so 4-bit inputs need no requires_grad hook).
    set_checkpointing(base, True)
    if settings.gradient_checkpointing == "unsloth":
        return peft_model, "on (transformers; 'unsloth' mode needs the unsloth backend)"
    return peft_model, "on (transformers)"


def verify_lora(applied: AppliedLora, matched: Mapping[str, Sequence[str]]) -> None:
    """Check LoRA tensors exist and train, every target got adapters, base weights are frozen."""
    model = applied.model
    lora_a: list[str] = []
    lora_b: list[str] = []
    frozen_lora: list[str] = []
    trainable_base: list[str] = []
    trainable = 0
    for name, param in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        if ".lora_A." in name:
            lora_a.append(name)
        elif ".lora_B." in name:
            lora_b.append(name)
        if is_lora and not param.requires_grad:
            frozen_lora.append(name)
        if not is_lora and param.requires_grad:
            trainable_base.append(name)
        if param.requires_grad:
            trainable += param.numel()
    expected = {n for names in matched.values() for n in names}
    wrapped = {_strip_peft_prefix(n) for n in _lora_layer_names(model)}
    layers = len(wrapped)
    summary = ", ".join(f"{t} x {len(n)}" for t, n in matched.items())
    if not lora_a or not lora_b:
        raise ModelCheckError(
            f"no LoRA tensors after get_peft_model (lora_A: {len(lora_a)}, lora_B: "
            f"{len(lora_b)}); expected adapters on {summary}"
        )
    if frozen_lora:
        raise ModelCheckError(
            f"{len(frozen_lora)} LoRA tensors are frozen (requires_grad=False), e.g. "
            f"{frozen_lora[0]}; the optimiser would train nothing there"
        )
    if wrapped != expected:
        missing = sorted(expected - wrapped)
        extra = sorted(wrapped - expected)
        raise ModelCheckError(
            f"LoRA adapters landed on {layers} modules, expected {len(expected)} ({summary}); "
            + (f"missing: {', '.join(missing[:6])}; " if missing else "")
            + (f"unexpected: {', '.join(extra[:6])}" if extra else "")
        )
    if len(lora_a) != layers or len(lora_b) != layers:
        raise ModelCheckError(
            f"{len(lora_a)} lora_A and {len(lora_b)} lora_B tensors for {layers} adapted "
            "modules; expected one of each per module"
        )
    if trainable_base:
        raise ModelCheckError(
            f"{len(trainable_base)} base-model parameters are trainable next to the LoRA "
            f"adapters (e.g. {', '.join(trainable_base[:3])}); QLoRA keeps the base frozen, and "
            "training them costs memory and changes the shared model"
        )
    applied.lora_layers = layers
    applied.lora_tensors = len(lora_a) + len(lora_b)
    applied.trainable_parameters = trainable


def remove_lora(applied: AppliedLora) -> bool:
    """Take the adapters off; return whether the base model is back as it was (reusable)."""
    loaded = applied.base
    if loaded.released or loaded.model is None:
        return False
    if loaded.backend == "unsloth":
        # unsloth's get_peft_model also patches forward functions, the gradient checkpointing
        # hooks and the training flags of the base model in place; unload() does not undo that,
        # so the base is not reused: the cache reloads it for the next test.
        applied.model = None
        return False
    base = loaded.model
    try:
        unloaded = applied.model.unload()
        if unloaded is not base:
            return False
        if checkpointing_enabled(base) and not applied.state_before.checkpointing:
            set_checkpointing(base, False)
        wanted = dict(applied.state_before.requires_grad)
        for name, param in base.named_parameters():
            if name in wanted:
                param.requires_grad_(wanted[name])
        base.train(applied.state_before.training)
    except Exception:
        return False
    finally:
        applied.model = None
    return snapshot_state(base) == applied.state_before
