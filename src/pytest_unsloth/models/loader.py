"""Load a causal LM in 4-bit, verify it really is 4-bit, release it and check the memory came back.

Plain functions and a small cache, no pytest fixtures: :mod:`pytest_unsloth.fixtures` puts thin
fixtures on top, :mod:`pytest_unsloth.models.lora` adds the adapters. Two backends:

* ``unsloth``: ``FastLanguageModel.from_pretrained(load_in_4bit=True)``; chosen when unsloth is
  installed and CUDA is available.
* ``transformers``: ``AutoModelForCausalLM`` with a ``BitsAndBytesConfig`` NF4 config; works on
  CPU with bitsandbytes >= 0.50, so CPU CI tests the real thing.

Failures are :class:`ModelLoadError` (nothing loaded: bad name, offline, missing backend) and
:class:`ModelCheckError` (loaded, but not what a 4-bit LoRA run needs). Both carry messages that
say what was found, why it matters and how to fix it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import os
import pathlib
import re
import sys
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

    from pytest_unsloth.models.lora import ModelState

__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL",
    "DTYPES",
    "LoadedModel",
    "ModelCache",
    "ModelCheckError",
    "ModelLoadError",
    "ModelRequest",
    "UnslothImportOrderWarning",
    "choose_backend",
    "count_4bit_layers",
    "import_order_problem",
    "load_4bit",
    "release",
    "resolve_model_path",
    "verify_4bit",
]

BACKENDS = ("auto", "unsloth", "transformers")
DTYPES = ("bfloat16", "float16", "float32")
TINY_PREFIX = "tiny:"
DEFAULT_MODEL = "tiny:llama"

# Modules that unsloth must be imported before, or its patches do not reach them.
PATCHED_BY_UNSLOTH = ("transformers", "trl", "peft")

# GPU memory that may stay allocated after a release without failing: allocator granularity
# plus small caches (RoPE tables, kernel workspaces) that libraries keep per process.
MEMORY_MARGIN_BYTES = 16 * 2**20
MEMORY_MARGIN_FRACTION = 0.05

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(Exception):
    """The model could not be loaded (nothing to verify)."""


class ModelCheckError(AssertionError):
    """The model loaded, or LoRA applied, but the result is not what training needs."""


class UnslothImportOrderWarning(pytest.PytestWarning):
    """unsloth is imported after a library it patches, so some of its patches are missing."""


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    """What to load; equal requests share one load (the cache key)."""

    name_or_path: str = DEFAULT_MODEL
    max_seq_length: int = 256
    dtype: str | None = None
    fast_inference: bool = False
    gpu_memory_utilization: float = 0.5
    allow_download: bool = False
    backend: str = "auto"
    # Extra keyword arguments for from_pretrained, sorted (key, value) pairs so the request
    # stays hashable; values are compared by repr.
    from_pretrained_kwargs: tuple[tuple[str, Any], ...] = ()
    # Where the name came from ("marker", "ini unsloth_model", ...); not part of the key.
    source: str = dataclasses.field(default="default", compare=False)

    @property
    def key(self) -> tuple[Any, ...]:
        """Hashable identity of the load (source excluded, extra kwargs by repr)."""
        return (
            self.name_or_path,
            self.max_seq_length,
            self.dtype,
            self.fast_inference,
            self.gpu_memory_utilization,
            self.allow_download,
            self.backend,
            repr(self.from_pretrained_kwargs),
        )


@dataclasses.dataclass(eq=False)
class LoadedModel:
    """A loaded 4-bit model and its tokenizer; unpacks as ``model, tokenizer``."""

    model: Any
    tokenizer: Any
    request: ModelRequest
    backend: str
    backend_reason: str
    path: str
    device: str
    dtype: str
    max_seq_length: int
    load_seconds: float
    quantized_layers: int = 0
    linear_layers: int = 0
    baseline_bytes: int = 0
    loaded_bytes: int = 0
    released: bool = False
    # The model's pristine state (lora.snapshot_state), taken once; tests are compared to it.
    state: ModelState | None = None

    def __iter__(self) -> Iterator[Any]:
        """Yield model then tokenizer, for ``model, tokenizer = loaded_4bit_model``."""
        yield self.model
        yield self.tokenizer

    def describe(self) -> str:
        """One line: backend, model, quantisation, dtype, device, max_seq_length, load time."""
        name = self.request.name_or_path
        where = "" if name == self.path else f" ({self.path})"
        return (
            f"{self.backend} backend ({self.backend_reason}): {name}{where} "
            f"from {self.request.source}; "
            f"{self.quantized_layers} of {self.linear_layers} Linear layers 4-bit, "
            f"{self.dtype}, {self.device}, max_seq_length {self.max_seq_length}, "
            f"loaded in {self.load_seconds:.2f} s"
        )


# ----------------------------------------------------------------------------- import order


def import_order_problem() -> list[str]:
    """Return the libraries unsloth patches that are already imported while unsloth is not."""
    if "unsloth" in sys.modules:
        return []
    return [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]


def import_order_message(imported: Sequence[str], *, when: str) -> str:
    """Explain a wrong import order and how to fix it."""
    return (
        f"unsloth is imported {when} after {', '.join(imported)}: unsloth patches these "
        "libraries at import time, so some of its speed-ups and fixes will be missing. "
        "Fix: pass --unsloth-import-first (or ini unsloth_import_first = true), or put "
        "`import unsloth` before any transformers/trl/peft import in conftest.py and test modules."
    )


def _import_unsloth() -> Any:
    """Import unsloth, warning first when a library it patches was imported before it."""
    imported = import_order_problem()
    if imported:
        warnings.warn(
            UnslothImportOrderWarning(import_order_message(imported, when="by loaded_4bit_model")),
            stacklevel=3,
        )
    import unsloth

    return unsloth


# ----------------------------------------------------------------------------- backend and name


def unsloth_installed() -> bool:
    """Return whether the unsloth package can be imported (without importing it)."""
    return importlib.util.find_spec("unsloth") is not None


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """Return (backend, reason): unsloth when installed and CUDA is available, else transformers."""
    if requested not in BACKENDS:
        raise ModelLoadError(
            f"unknown model backend {requested!r}; choose one of {', '.join(BACKENDS)}"
        )
    import torch

    cuda = torch.cuda.is_available()
    installed = unsloth_installed()
    if requested == "transformers":
        return "transformers", "requested"
    if requested == "unsloth":
        if not installed:
            raise ModelLoadError(
                "backend 'unsloth' was requested but unsloth is not installed; install it on a "
                "GPU machine or use backend='auto'"
            )
        if not cuda:
            raise ModelLoadError(
                "backend 'unsloth' was requested but torch sees no CUDA GPU "
                f"(torch {torch.__version__}); unsloth needs one. Use backend='auto' to fall back "
                "to transformers + bitsandbytes"
            )
        return "unsloth", "requested"
    if installed and cuda:
        return "unsloth", "unsloth installed, CUDA available"
    if not installed:
        return "transformers", "unsloth not installed"
    return "transformers", "no CUDA GPU for unsloth"


def _parse_tiny(name: str) -> tuple[str, str]:
    """Split ``tiny:ARCH[:SIZE]`` into (arch, size), validating both."""
    from pytest_unsloth.models import tiny

    parts = name[len(TINY_PREFIX) :].split(":")
    arch = parts[0] or "llama"
    size = parts[1] if len(parts) > 1 else "small"
    if len(parts) > 2 or arch not in tiny.ARCHITECTURES or size not in tiny.SIZES:
        raise ModelLoadError(
            f"bad tiny model name {name!r}: use tiny:ARCH or tiny:ARCH:SIZE with ARCH one of "
            f"{', '.join(tiny.ARCHITECTURES)} and SIZE one of {', '.join(tiny.SIZES)}"
        )
    return arch, size


def resolve_model_path(
    name: str,
    *,
    allow_download: bool = False,
    source: str = "default",
    tiny_cache_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Turn a model name into something from_pretrained loads without touching the network.

    ``tiny:ARCH[:SIZE]`` builds a tiny model; an existing folder is used as is; a Hub id is
    looked up in the local Hugging Face cache (a snapshot folder) unless downloads are allowed.
    Anything else is a :class:`ModelLoadError` at once, instead of a ~50 s Hub timeout.
    """
    if name.startswith(TINY_PREFIX):
        from pytest_unsloth.models import tiny

        arch, size = _parse_tiny(name)
        return str(tiny.build(arch, size=size, cache_dir=tiny_cache_dir))
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {name!r} (from {source}) has no config.json; point it at a "
                "folder written by save_pretrained"
            )
        return str(path.resolve())
    if path.exists():
        raise ModelLoadError(
            f"model path {name!r} (from {source}) is a file; give the folder that holds "
            "config.json and the weights"
        )
    looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelLoadError(
            f"model path {name!r} (from {source}) does not exist "
            f"(resolved to {str(path.absolute())!r}); fix the path or build a local model"
        )
    if allow_download:
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return str(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model {name!r} (from {source}) is neither a local folder (no "
            f"{str(path.absolute())!r}) nor in the Hugging Face cache, and downloads are off "
            f"({type(exc).__name__}). Fix: download it first (huggingface-cli download {name}), "
            "pass a local path, or allow downloads with --unsloth-allow-download "
            "(ini unsloth_allow_download = true)"
        ) from None


def _torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name to the torch dtype."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _resolve_dtype(requested: str | None, cuda: bool) -> str:
    """Auto dtype: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU."""
    if requested is not None:
        if requested not in DTYPES:
            raise ModelLoadError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPES)}")
        return requested
    if not cuda:
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _cuda_ready() -> bool:
    """Return whether CUDA is available and already initialised in this process."""
    import torch

    initialized: bool = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    return bool(torch.cuda.is_available()) and initialized


def _allocated_bytes() -> int:
    """Return CUDA memory allocated by tensors on the current device (0 without CUDA)."""
    import torch

    if not _cuda_ready():
        return 0
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide the progress bars from_pretrained draws (noise in captured output)."""
    from pytest_unsloth.models.tiny import quiet_progress_bars

    with quiet_progress_bars():
        yield


# ----------------------------------------------------------------------------- loading


def load_4bit(
    request: ModelRequest, *, tiny_cache_dir: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """Load ``request`` in 4-bit with the chosen backend and verify the result."""
    from pytest_unsloth.util.offline import hub_offline

    # Our load must not reach the Hub unless downloads are allowed (issue 11).
    with hub_offline(request.allow_download):
        return _load_4bit(request, tiny_cache_dir=tiny_cache_dir)


def _load_4bit(
    request: ModelRequest, *, tiny_cache_dir: str | os.PathLike[str] | None = None
) -> LoadedModel:
    if request.max_seq_length <= 0:
        raise ModelLoadError(f"max_seq_length must be positive, got {request.max_seq_length}")
    backend, reason = choose_backend(request.backend)
    if backend == "unsloth":
        # Before anything below imports transformers (tiny.build does).
        _import_unsloth()
    import torch

    cuda = torch.cuda.is_available()
    dtype = _resolve_dtype(request.dtype, cuda)
    path = resolve_model_path(
        request.name_or_path,
        allow_download=request.allow_download,
        source=request.source,
        tiny_cache_dir=tiny_cache_dir,
    )
    extra = dict(request.from_pretrained_kwargs)
    if not request.allow_download:
        extra.setdefault("local_files_only", True)
    baseline = _allocated_bytes()
    start = time.perf_counter()
    try:
        if backend == "unsloth":
            model, tokenizer = _load_unsloth(request, path, dtype, extra)
            device = "cuda"
        else:
            model, tokenizer, device = _load_transformers(request, path, dtype, cuda, extra)
    except (ModelLoadError, ModelCheckError):
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"loading {request.name_or_path!r} (from {request.source}) with the {backend} backend "
            f"failed: {type(exc).__name__}: {first_line}"
        ) from exc
    seconds = time.perf_counter() - start
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        request=request,
        backend=backend,
        backend_reason=reason,
        path=path,
        device=device,
        dtype=dtype,
        max_seq_length=request.max_seq_length,
        load_seconds=seconds,
        baseline_bytes=baseline,
        loaded_bytes=_allocated_bytes() - baseline,
    )
    try:
        verify_4bit(loaded)
    except ModelCheckError:
        release(loaded, check=False)
        raise
    return loaded


def _load_unsloth(
    request: ModelRequest, path: str, dtype: str, extra: dict[str, Any]
) -> tuple[Any, Any]:
    """Load through unsloth's FastLanguageModel in 4-bit."""
    from unsloth import FastLanguageModel

    kwargs: dict[str, Any] = {
        "model_name": path,
        "max_seq_length": request.max_seq_length,
        "dtype": _torch_dtype(dtype),
        "load_in_4bit": True,
        "fast_inference": request.fast_inference,
        **extra,
    }
    if request.fast_inference:
        kwargs["gpu_memory_utilization"] = request.gpu_memory_utilization
    model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    return model, tokenizer


def keep_cpu_layout_trainable(model: Any) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; return the layers changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place on its
    first eval-mode forward without grad (``packing_format_for_cpu``) and from then on uses
    ``gemv_4bit``, which has no autograd: a later QLoRA step silently drops the gradient through
    every 4-bit layer (only adapters after the last one train). A shared session model sees both
    kinds of test, so the fast inference layout is switched off.
    """
    bnb: Any = importlib.import_module("bitsandbytes")
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(
            module, "support_avx512bf16_for_cpu", False
        ):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def cpu_packed_layers(model: Any) -> list[str]:
    """Return the 4-bit layers whose weights bitsandbytes repacked for CPU inference."""
    names = []
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            names.append(name)
    return names


def _import_on_a_clean_stack(module: str) -> None:
    """Import ``module`` in a short-lived thread, so no frame of ours is kept by its import.

    bitsandbytes on CPU logs a caught ImportError (the optional ``kernels`` package) with the
    exception as a log argument; pytest keeps the record until the test ends, the exception's
    traceback keeps every calling frame, and a frame of ours would keep the model alive. Frames
    of a separate thread lead nowhere.
    """
    if module in sys.modules:
        return
    from pytest_unsloth.util.timelimit import call_in_thread

    call_in_thread(
        lambda: importlib.import_module(module), None, name=f"pytest-unsloth-import-{module}"
    )


def _load_transformers(
    request: ModelRequest, path: str, dtype: str, cuda: bool, extra: dict[str, Any]
) -> tuple[Any, Any, str]:
    """Load through transformers with a bitsandbytes NF4 config (CPU or GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from pytest_unsloth.models import tiny

    if request.fast_inference:
        # A CPU CI lane often shares the ini of the GPU lane: run the test without vLLM.
        warnings.warn(
            pytest.PytestWarning(
                f"fast_inference=True is ignored for {request.name_or_path!r} on the "
                "transformers backend: it needs unsloth with vLLM on a GPU"
            ),
            stacklevel=2,
        )
    _import_on_a_clean_stack("bitsandbytes")
    torch_dtype = _torch_dtype(dtype)
    quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch_dtype,
        bnb_4bit_use_double_quant=True,
    )
    device_map: Any = {"": torch.cuda.current_device()} if cuda else "cpu"
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization,
            device_map=device_map,
            dtype=torch_dtype,
            **extra,
        )
    tokenizer: Any
    if tiny.is_tiny_model(path):
        tokenizer = tiny.load_tokenizer(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=extra.get("local_files_only", False)
        )
    if not cuda:
        keep_cpu_layout_trainable(model)
    # unsloth records the length on the model; do the same so code under test can read it.
    setattr(model, "max_seq_length", request.max_seq_length)  # noqa: B010 (a typed Module)
    return model, tokenizer, "cuda" if cuda else "cpu"


# ----------------------------------------------------------------------------- verification


def count_4bit_layers(model: Any) -> tuple[int, int, list[str]]:
    """Return (4-bit layers, Linear layers, names of Linear layers that are not 4-bit)."""
    import torch

    bnb: Any
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception:  # bitsandbytes missing or broken: then nothing can be 4-bit
        bnb = None
    quantized = 0
    linear = 0
    plain: list[str] = []
    for name, module in model.named_modules():
        is_4bit = (
            bnb is not None
            and isinstance(module, bnb.nn.Linear4bit)
            and isinstance(module.weight, bnb.nn.Params4bit)
            and getattr(module.weight, "quant_state", None) is not None
        )
        if is_4bit:
            quantized += 1
            linear += 1
        elif isinstance(module, torch.nn.Linear):
            linear += 1
            plain.append(name)
    return quantized, linear, plain


def verify_4bit(loaded: LoadedModel) -> None:
    """Check the model is a 4-bit torch module on the right device and dtype, ready to train."""
    import torch

    model: Any = loaded.model
    what = f"{loaded.request.name_or_path!r} ({loaded.backend} backend)"
    if not isinstance(loaded.model, torch.nn.Module):
        raise ModelCheckError(
            f"{what} returned a {type(model).__name__}, not a torch.nn.Module; "
            "the loader did not produce a model"
        )
    _check_4bit_layers(loaded, model, what)
    _check_tokenizer(loaded, what)
    _check_sequence_length(loaded, model, what)


def _check_4bit_layers(loaded: LoadedModel, model: Any, what: str) -> None:
    """The Linear layers are bitsandbytes 4-bit, all on the device, computing in the dtype."""
    quantized, linear, plain = count_4bit_layers(model)
    loaded.quantized_layers, loaded.linear_layers = quantized, linear
    if quantized == 0:
        shown = ", ".join(plain[:5]) + (", ..." if len(plain) > 5 else "")
        raise ModelCheckError(
            f"{what} loaded without 4-bit layers: 0 of {linear} Linear layers are bitsandbytes "
            f"Linear4bit ({shown or 'no Linear layers'}). The load fell back to full precision, "
            "so memory use and speed are not what training will see. Fix: check that "
            "bitsandbytes imports and works (python -m bitsandbytes) and that nothing overrides "
            "the quantization config"
        )
    bnb: Any = importlib.import_module("bitsandbytes")
    devices: dict[str, int] = {}
    compute: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            devices[module.weight.device.type] = devices.get(module.weight.device.type, 0) + 1
            cd = str(module.compute_dtype).replace("torch.", "")
            compute[cd] = compute.get(cd, 0) + 1
    if set(devices) != {loaded.device}:
        raise ModelCheckError(
            f"{what}: 4-bit layers are on {_counts(devices)}, expected all on {loaded.device}; "
            "part of the model was offloaded (not enough free memory?) and will be slow"
        )
    if set(compute) - {"None"} - {loaded.dtype}:
        raise ModelCheckError(
            f"{what}: 4-bit layers compute in {_counts(compute)}, expected {loaded.dtype}"
        )
    # unsloth manages embedding precision itself (it may upcast or offload them), so the
    # compute dtype above is what is checked there.
    embedding = model.get_input_embeddings() if loaded.backend == "transformers" else None
    if embedding is not None and str(embedding.weight.dtype).replace("torch.", "") != loaded.dtype:
        raise ModelCheckError(
            f"{what}: input embeddings are {embedding.weight.dtype}, expected {loaded.dtype}"
        )


def _check_tokenizer(loaded: LoadedModel, what: str) -> None:
    """A tokenizer came with the model, and it has a pad token."""
    if loaded.tokenizer is None:
        raise ModelCheckError(f"{what} loaded no tokenizer")
    if getattr(loaded.tokenizer, "pad_token", None) is None:
        raise ModelCheckError(
            f"the tokenizer of {what} has no pad token (eos is "
            f"{getattr(loaded.tokenizer, 'eos_token', None)!r}); batched training and TRL "
            "trainers need one. Fix: add pad_token to the model's tokenizer_config.json "
            "(a reserved token, not eos, so the model still learns to stop)"
        )


def _check_sequence_length(loaded: LoadedModel, model: Any, what: str) -> None:
    """The model records the max_seq_length asked for, and its positions reach that far."""
    recorded = getattr(model, "max_seq_length", None)
    if recorded != loaded.max_seq_length:
        raise ModelCheckError(
            f"{what}: model.max_seq_length is {recorded!r}, expected {loaded.max_seq_length}"
        )
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if (
        loaded.backend == "transformers"
        and isinstance(limit, int)
        and loaded.max_seq_length > limit
    ):
        raise ModelCheckError(
            f"{what}: max_seq_length {loaded.max_seq_length} exceeds the model's "
            f"max_position_embeddings {limit}; unsloth scales RoPE for longer sequences, plain "
            "transformers does not. Lower max_seq_length"
        )


def _counts(counts: Mapping[str, int]) -> str:
    """Format {'cpu': 3, 'cuda': 11} as 'cpu (3), cuda (11)'."""
    return ", ".join(f"{key} ({n})" for key, n in sorted(counts.items()))


def _referrer_names(obj: object, ignore: Sequence[object]) -> list[str]:
    """Name the types of objects that still refer to ``obj`` (a hint for a leak)."""
    ignored = {id(x) for x in ignore}
    names: list[str] = []
    for ref in gc.get_referrers(obj):
        if id(ref) in ignored or isinstance(ref, weakref.ref):
            continue
        if type(ref).__name__ == "frame":
            code = getattr(ref, "f_code", None)
            names.append(f"frame of {getattr(code, 'co_name', '?')}()")
        else:
            names.append(type(ref).__name__)
    return sorted(set(names))[:8]


def release(loaded: LoadedModel, *, check: bool = True) -> None:
    """Drop the model, collect garbage, empty the CUDA cache and check the memory came back."""
    if loaded.released:
        return
    model_ref = weakref.ref(loaded.model) if loaded.model is not None else None
    loaded.model = None
    loaded.tokenizer = None
    loaded.released = True
    gc.collect()
    gc.collect()
    import torch

    if loaded.backend == "unsloth":
        _shrink_unsloth_buffers()
    if _cuda_ready():
        torch.cuda.synchronize()
        _clear_cublas_workspaces(torch)
        torch.cuda.empty_cache()
    if not check:
        return
    alive = model_ref is not None and model_ref() is not None
    if alive and _forget_last_failure():
        gc.collect()
        alive = model_ref is not None and model_ref() is not None
    holders = _referrer_names(model_ref(), [loaded]) if model_ref is not None and alive else []
    after = _allocated_bytes()
    leaked = after - loaded.baseline_bytes
    margin = max(MEMORY_MARGIN_BYTES, int(MEMORY_MARGIN_FRACTION * max(loaded.loaded_bytes, 0)))
    name = f"{loaded.request.name_or_path!r} ({loaded.backend} backend)"
    if loaded.device == "cuda" and leaked > margin:
        raise ModelCheckError(
            f"GPU memory was not released after {name}: {_mib(after)} allocated now, "
            f"{_mib(loaded.baseline_bytes)} before the load ({_mib(leaked)} more; the model "
            f"took {_mib(loaded.loaded_bytes)}, allowed margin {_mib(margin)}). "
            + (
                f"The model is still referenced by: {', '.join(holders) or 'unknown objects'}. "
                if alive
                else "The model object itself was freed; other tensors created since the load "
                "are still alive. "
            )
            + "Fix: do not keep the model, a trainer or outputs in module globals, class "
            "attributes or longer-scoped fixtures"
        )
    if alive:
        raise ModelCheckError(
            f"{name} is still referenced after teardown (by: {', '.join(holders) or 'unknown'}), "
            "so its memory cannot be freed. Fix: do not keep the model, a trainer or outputs in "
            "module globals, class attributes or longer-scoped fixtures"
        )


def _clear_cublas_workspaces(torch: Any) -> None:
    """Free cuBLAS' per-handle workspaces (32 MiB each on an H100).

    The first matmul after a load allocates them through the caching allocator and they live
    for the whole process, so the release check would count them as memory the model kept
    (seen on the H100: 32 MiB after a LoRA step, 64 MiB after two GRPO steps).
    """
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        with contextlib.suppress(Exception):
            clear()


def _shrink_unsloth_buffers() -> None:
    """Shrink unsloth's gradient checkpointing buffers to their initial size (a few MiB).

    They are process-wide and grow with the activations of the last training run; after a
    release they would otherwise be counted as memory the model failed to return.
    """
    with contextlib.suppress(Exception):
        module: Any = importlib.import_module("unsloth_zoo.gradient_checkpointing")
        module.reset_unsloth_gradient_checkpointing_buffers()


def _forget_last_failure() -> bool:
    """Drop ``sys.last_*``; return whether there was a failure kept there.

    pytest stores the last failure there for post-mortem debugging (done by teardown time);
    its traceback holds the failed test's frame and so its model, which would turn a real
    failure into a second, misleading "not released" error. Clearing the frames instead is not
    an option: clearing suspended generator frames (pluggy's) crashes CPython 3.11's GC.
    """
    found = False
    for name in ("last_exc", "last_value", "last_traceback", "last_type"):
        if getattr(sys, name, None) is not None:
            found = True
            with contextlib.suppress(AttributeError):
                delattr(sys, name)
    return found


def _mib(n: int) -> str:
    """Format bytes as MiB."""
    return f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- cache


class ModelCache:
    """Session cache of loaded models keyed by request; at most ``max_resident`` kept loaded."""

    def __init__(
        self, tiny_cache_dir: str | os.PathLike[str] | None = None, max_resident: int = 1
    ) -> None:
        self.tiny_cache_dir = tiny_cache_dir
        self.max_resident = max_resident
        self.loads = 0
        self._models: dict[tuple[Any, ...], LoadedModel] = {}
        self._errors: dict[tuple[Any, ...], str] = {}

    def get(self, request: ModelRequest) -> LoadedModel:
        """Return the loaded model for ``request``, loading (and verifying) it on first use."""
        key = request.key
        if key in self._errors:
            raise ModelLoadError(self._errors[key] + " (same failure as the first attempt)")
        loaded = self._models.get(key)
        if loaded is not None:
            return loaded
        # Make room first: two big models at once would not fit where one does.
        while len(self._models) >= self.max_resident:
            self.evict(next(iter(self._models)))
        try:
            loaded = load_4bit(request, tiny_cache_dir=self.tiny_cache_dir)
        except (ModelLoadError, ModelCheckError) as exc:
            self._errors[key] = str(exc)
            raise
        self.loads += 1
        self._models[key] = loaded
        return loaded

    def evict(self, key: tuple[Any, ...]) -> None:
        """Release one model; raises ModelCheckError if its memory did not come back."""
        loaded = self._models.pop(key, None)
        if loaded is not None:
            release(loaded)

    def evict_model(self, loaded: LoadedModel) -> None:
        """Release ``loaded`` if it is the cached model for its request."""
        if self._models.get(loaded.request.key) is loaded:
            self.evict(loaded.request.key)

    def close(self) -> list[str]:
        """Release every model; return the problems found (empty when all memory came back)."""
        problems: list[str] = []
        for key in list(self._models):
            try:
                self.evict(key)
            except ModelCheckError as exc:
                problems.append(str(exc))
        return problems
