"""The fixtures: ``gpu`` / ``gpus``, ``loaded_4bit_model``, ``peft_model``, pieces users override.

Registered as a plugin by ``plugin.py`` at configure time; imports only the standard library and
pytest at module level (the ML stack loads when a fixture is first used).

``gpu`` / ``gpus`` read NVML when the test sets up (fixtures set up before them, such as a model
load, change free memory) through the session's NVML connection the ``requires_*`` markers share,
and skip the test when no GPU is usable, as a marker would.

Scopes of the model fixtures, and why:

* ``unsloth_model_cache`` (session) holds the loaded models, keyed by their load configuration,
  so twenty tests that use the same model pay for one load. At most one model is resident: a
  test asking for another configuration releases the previous one first.
* ``loaded_4bit_model`` (function) resolves which model the test wants (a marker can differ per
  test, which a session fixture cannot see) and hands out the cached load. After the test it
  restores the flags a trainer flips (train mode, requires_grad, gradient checkpointing); if the
  test changed the model's structure (its own ``get_peft_model``), the model is reloaded for the
  next test and a warning names the test.
  Session-scoped code of a user's own can share the same cache:
  ``unsloth_model_cache.get(ModelRequest("tiny:qwen2"))``.
* ``peft_model`` (function) adds LoRA adapters for one test and removes them afterwards, so one
  test's adapters never reach another test's model. On the transformers backend ``unload()``
  restores the shared base (checked); unsloth patches the base in place, so there the base is
  released and the next test reloads it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types
import warnings
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pytest

from pytest_unsloth.gpu import GpuInfo
from pytest_unsloth.markers import (
    gpu_inventory,
    skip_or_fail,
    torch_cached_bytes,
    visibility_problem,
)
from pytest_unsloth.models.loader import (
    BACKENDS,
    DEFAULT_MODEL,
    DTYPES,
    ModelCheckError,
    ModelLoadError,
    ModelRequest,
    UnslothImportOrderWarning,
    import_order_message,
    import_order_problem,
    unsloth_installed,
)
from pytest_unsloth.pinning import PIN_KEY

if TYPE_CHECKING:
    from pytest_unsloth.models.loader import LoadedModel, ModelCache
    from pytest_unsloth.models.lora import LoraSettings, ModelState
    from pytest_unsloth.settings import Settings

T = TypeVar("T")

MARKER_HELP = (
    "unsloth_model(name_or_path=None, *, max_seq_length=None, dtype=None, fast_inference=None, "
    "gpu_memory_utilization=None, allow_download=None, backend=None, "
    "from_pretrained_kwargs=None): the model loaded_4bit_model and peft_model load for this test "
    "(a local folder, a Hub id in the local cache, or tiny:ARCH[:SIZE]); keywords override "
    "--unsloth-*/ini unsloth_* load options for this test. backend: auto, unsloth, transformers."
)

PROPERTY_SUMMARY = "unsloth_model"


def _sig_unsloth_model(
    name_or_path: object = None,
    *,
    max_seq_length: object = None,
    dtype: object = None,
    fast_inference: object = None,
    gpu_memory_utilization: object = None,
    allow_download: object = None,
    backend: object = None,
    from_pretrained_kwargs: object = None,
) -> None:
    """Signature of ``@pytest.mark.unsloth_model``; binding to it names a bad argument."""


class ConfiguredName(str):
    """A model name from --unsloth-model / ini, carrying where it came from."""

    source: str

    def __new__(cls, value: str, source: str) -> ConfiguredName:
        """Make the string and remember its source."""
        obj = super().__new__(cls, value)
        obj.source = source
        return obj


# ----------------------------------------------------------------------------- hooks


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker help line; import unsloth first when asked to."""
    config.addinivalue_line("markers", MARKER_HELP)
    settings = _settings(config)
    if settings.import_first:
        import_first(config, source=settings.source("import_first"))


def import_first(config: pytest.Config, *, source: str) -> str:
    """Import unsloth now when it is installed and a GPU is present; return what happened."""

    def warn(warning: Warning) -> None:
        config.issue_config_time_warning(warning, stacklevel=2)

    if not unsloth_installed():
        warn(
            pytest.PytestConfigWarning(
                f"pytest-unsloth: {source} asks to import unsloth first, but unsloth is not "
                "installed; nothing was imported"
            )
        )
        return "not installed"
    if "unsloth" in sys.modules:
        return "already imported"
    import torch

    if not torch.cuda.is_available():
        # unsloth raises without a GPU; a CPU run with the same ini is normal (CI), not an error.
        return "no GPU"
    imported = import_order_problem()
    if imported:
        warn(
            UnslothImportOrderWarning(
                import_order_message(imported, when="at configure time (pytest-unsloth)")
                + ". They were imported before pytest_configure, by a conftest.py or another "
                "plugin: move that import below `import unsloth`"
            )
        )
    try:
        import unsloth  # noqa: F401
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        warn(
            pytest.PytestConfigWarning(
                f"pytest-unsloth: {source}: import unsloth failed: {type(exc).__name__}: {first}"
            )
        )
        return "failed"
    return "imported"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the models the fixtures loaded, with their backend (read from the reports)."""
    lines: dict[str, None] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for key, value in getattr(report, "user_properties", ()):
                if key == PROPERTY_SUMMARY:
                    lines.setdefault(str(value), None)
    if lines:
        terminalreporter.write_sep("-", "unsloth models")
        for line in lines:
            terminalreporter.write_line(line)


# ----------------------------------------------------------------------------- resolution


def _settings(config: pytest.Config) -> Settings:
    """Return the plugin's resolved settings."""
    from pytest_unsloth.settings import get_settings

    return get_settings(config)


def _call(item: pytest.Item, action: Callable[[], T]) -> T:
    """Run ``action``; a model error fails this test cleanly.

    The failure is raised after the ``except`` block so that it carries no chained exception:
    that one's traceback holds frames whose locals reference the model, and anything keeping
    the report's call info (pytester, some plugins) would keep the model alive.
    """
    from pytest_unsloth.util.quiet import library_noise_silenced
    from pytest_unsloth.util.scratch import torch_caches

    problem = ""
    try:
        # torch's import-time cache folders not in $TMPDIR; our own calls' library noise hidden.
        with torch_caches(item.config), library_noise_silenced():
            return action()
    except (ModelLoadError, ModelCheckError) as exc:
        problem = str(exc)
    _fail(item, problem)


def _fail(item: pytest.Item, message: str) -> NoReturn:
    """Error this one test with a message and no traceback."""
    # "from None": the library exception behind the message would only add a traceback.
    raise pytest.fail.Exception(f"{item.nodeid}: {message}", pytrace=False) from None


def _signature_text() -> str:
    """Render the marker signature without annotations."""
    sig = inspect.signature(_sig_unsloth_model)
    bare = sig.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    return "unsloth_model" + str(bare)


def _marker_overrides(mark: pytest.Mark) -> dict[str, Any]:
    """Validate ``@pytest.mark.unsloth_model(...)`` and return its non-None arguments."""
    try:
        bound = inspect.signature(_sig_unsloth_model).bind(*mark.args, **mark.kwargs)
    except TypeError as exc:
        raise ModelLoadError(
            f"bad @pytest.mark.unsloth_model arguments: {exc}. Signature: {_signature_text()}"
        ) from None
    args = {k: v for k, v in bound.arguments.items() if v is not None}

    def bad(key: str, expected: str) -> ModelLoadError:
        return ModelLoadError(
            f"@pytest.mark.unsloth_model({key}={args[key]!r}): {key} must be {expected}"
        )

    if "name_or_path" in args:
        if isinstance(args["name_or_path"], os.PathLike):
            args["name_or_path"] = os.fspath(args["name_or_path"])
        if not isinstance(args["name_or_path"], str) or not args["name_or_path"]:
            raise bad("name_or_path", "a non-empty string or path")
    if "max_seq_length" in args and (
        not isinstance(args["max_seq_length"], int)
        or isinstance(args["max_seq_length"], bool)
        or args["max_seq_length"] <= 0
    ):
        raise bad("max_seq_length", "a positive int")
    if "dtype" in args:
        aliases = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
        value = args["dtype"]
        if not isinstance(value, str) or (value not in DTYPES and value not in aliases):
            raise bad("dtype", f"one of auto, {', '.join(DTYPES)}")
        args["dtype"] = aliases.get(value, value)  # "auto" stays an override: None
    for key in ("fast_inference", "allow_download"):
        if key in args and not isinstance(args[key], bool):
            raise bad(key, "True or False")
    if "gpu_memory_utilization" in args:
        value = args["gpu_memory_utilization"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise bad("gpu_memory_utilization", "a fraction in (0, 1]")
    if "backend" in args and args["backend"] not in BACKENDS:
        raise bad("backend", f"one of {', '.join(BACKENDS)}")
    if "from_pretrained_kwargs" in args and not (
        isinstance(args["from_pretrained_kwargs"], dict)
        and all(isinstance(k, str) for k in args["from_pretrained_kwargs"])
    ):
        raise bad("from_pretrained_kwargs", "a dict of keyword arguments")
    return args


def build_request(item: pytest.Item, settings: Settings, fixture_name: str | None) -> ModelRequest:
    """Resolve the model for a test: marker > unsloth_model_name fixture > CLI > ini > tiny."""
    mark = item.get_closest_marker("unsloth_model")
    overrides = _marker_overrides(mark) if mark is not None else {}
    if "name_or_path" in overrides:
        name, source = overrides["name_or_path"], f"@pytest.mark.unsloth_model on {item.name}"
    elif isinstance(fixture_name, ConfiguredName):
        name, source = str(fixture_name), fixture_name.source
    elif fixture_name is not None:
        if not isinstance(fixture_name, str) or not fixture_name:
            raise ModelLoadError(
                f"the unsloth_model_name fixture returned {fixture_name!r}; it must return a "
                "model name or path (a non-empty str), or None for the default"
            )
        name, source = fixture_name, "fixture unsloth_model_name"
    else:
        name, source = DEFAULT_MODEL, "the default tiny model"

    def pick(key: str, field: str) -> Any:
        return overrides[key] if key in overrides else getattr(settings, field)

    extra = overrides.get("from_pretrained_kwargs", {})
    return ModelRequest(
        name_or_path=name,
        max_seq_length=pick("max_seq_length", "max_seq_length"),
        dtype=pick("dtype", "dtype"),
        fast_inference=pick("fast_inference", "fast_inference"),
        gpu_memory_utilization=float(pick("gpu_memory_utilization", "gpu_memory_utilization")),
        allow_download=pick("allow_download", "allow_download"),
        backend=overrides.get("backend", "auto"),
        from_pretrained_kwargs=tuple(sorted(extra.items())),
        source=source,
    )


# ----------------------------------------------------------------------------- gpu / gpus


def _info_list(request: pytest.FixtureRequest) -> tuple[GpuInfo, ...]:
    config = request.config
    # Read when the fixture is set up: fixtures set up before it (a model load) change memory.
    inv = gpu_inventory(config)
    snap = inv.snapshot(memory_of=[d.uuid for d in inv.static().visible])
    problem = visibility_problem(snap, config.stash.get(PIN_KEY, None))
    if problem is not None:
        skip_or_fail(request.node, f"no usable GPU: {problem}")
    return tuple(
        GpuInfo.from_device(d, snap, torch_cached_bytes=torch_cached_bytes(i))
        for i, d in enumerate(snap.visible)
    )


@pytest.fixture
def gpu(request: pytest.FixtureRequest) -> GpuInfo:
    """The GPU this test runs on (cuda:0 as this process sees it), memory read now; else skip."""
    return _info_list(request)[0]


@pytest.fixture
def gpus(request: pytest.FixtureRequest) -> tuple[GpuInfo, ...]:
    """Every GPU visible to this process, in CUDA order, memory read now; skips without one."""
    return _info_list(request)


# ----------------------------------------------------------------------------- model fixtures


@pytest.fixture
def unsloth_model_name(request: pytest.FixtureRequest) -> str | None:
    """The model to load: --unsloth-model or ini unsloth_model; override it in conftest.py."""
    settings = _settings(request.config)
    if settings.model is None:
        return None
    return ConfiguredName(settings.model, settings.source("model"))


@pytest.fixture
def unsloth_lora_settings(request: pytest.FixtureRequest) -> LoraSettings:
    """LoRA settings for peft_model from ini unsloth_lora_*; override or parametrize it."""
    from pytest_unsloth.models.lora import LoraSettings

    s = _settings(request.config)
    return LoraSettings(
        r=s.lora_r,
        alpha=s.lora_alpha,
        dropout=s.lora_dropout,
        target_modules=tuple(s.lora_target_modules),
        gradient_checkpointing=s.gradient_checkpointing,
    )


@pytest.fixture(scope="session")
def unsloth_model_cache(
    tmp_path_factory: pytest.TempPathFactory,
) -> Generator[ModelCache, None, None]:
    """Session cache of 4-bit loads; releases them at the end and checks the memory came back."""
    from pytest_unsloth.models.loader import ModelCache

    cache = ModelCache(tiny_cache_dir=tmp_path_factory.mktemp("unsloth-tiny-models"))
    yield cache
    problems = cache.close()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _record(item: pytest.Item, loaded: LoadedModel, *, cached: bool) -> None:
    """Put the backend and model on the report (JSON/junit) and in the test's output."""
    line = loaded.describe()
    item.user_properties.append(("unsloth_backend", loaded.backend))
    item.user_properties.append(("unsloth_model_path", loaded.path))
    item.user_properties.append((PROPERTY_SUMMARY, line))
    item.add_report_section(
        "setup", "unsloth model", line + (" (reused from the session cache)" if cached else "")
    )


@pytest.fixture
def loaded_4bit_model(
    request: pytest.FixtureRequest,
    unsloth_model_name: str | None,
    unsloth_model_cache: ModelCache,
) -> Generator[LoadedModel, None, None]:
    """A 4-bit model and its tokenizer, loaded once per configuration; unpacks as model, tok."""
    from pytest_unsloth.compat.distributions import require_installed

    require_installed(("torch", "transformers", "bitsandbytes"), "the loaded_4bit_model fixture")
    from pytest_unsloth.models.lora import describe_state_change, snapshot_state

    item = request.node
    req = _call(item, lambda: build_request(item, _settings(request.config), unsloth_model_name))
    loads = unsloth_model_cache.loads
    loaded = _call(item, lambda: unsloth_model_cache.get(req))
    _record(item, loaded, cached=unsloth_model_cache.loads == loads)
    if loaded.state is None:
        loaded.state = snapshot_state(loaded.model)
    before = loaded.state
    yield loaded
    if loaded.released or loaded.model is None:
        return  # peft_model (unsloth backend) already released it
    model = loaded.model
    _restore_flags(model, before)
    after = snapshot_state(model)
    if after != before:
        change = describe_state_change(before, after)
        warnings.warn(
            pytest.PytestWarning(
                f"{item.nodeid} changed the shared 4-bit model ({change}); it is reloaded for "
                "the next test. Use the peft_model fixture for adapters (it removes them after "
                "each test), or load a private model"
            ),
            stacklevel=1,
        )
        del model
        _call(item, lambda: unsloth_model_cache.evict_model(loaded))


def _restore_flags(model: Any, before: ModelState) -> None:
    """Undo what a trainer flips on a model: requires_grad, train mode, gradient checkpointing."""
    from pytest_unsloth.models.lora import checkpointing_enabled, set_checkpointing

    wanted = dict(before.requires_grad)
    for name, param in model.named_parameters():
        if name in wanted and param.requires_grad != wanted[name]:
            param.requires_grad_(wanted[name])
    if bool(model.training) != before.training:
        model.train(before.training)
    if checkpointing_enabled(model) and not before.checkpointing:
        # A model class without the switch: the snapshot comparison reports it.
        with contextlib.suppress(Exception):
            set_checkpointing(model, False)


@pytest.fixture
def peft_model(
    request: pytest.FixtureRequest,
    loaded_4bit_model: LoadedModel,
    unsloth_lora_settings: LoraSettings,
    unsloth_model_cache: ModelCache,
) -> Generator[Any, None, None]:
    """The 4-bit model with fresh LoRA adapters for this test (a PEFT model); removed after it."""
    from pytest_unsloth.compat.distributions import require_installed
    from pytest_unsloth.models.lora import apply_lora, remove_lora

    require_installed(("peft",), "the peft_model fixture")
    item = request.node
    applied = _call(item, lambda: apply_lora(loaded_4bit_model, unsloth_lora_settings))
    line = applied.describe()
    item.user_properties.append(("unsloth_lora", line))
    item.add_report_section("setup", "unsloth lora", line)
    peft = applied.model
    yield peft
    reusable = remove_lora(applied)
    # The test's funcargs keep the PEFT wrapper until after teardown; empty it so it cannot keep
    # the base model (and its GPU memory) alive.
    _empty_module(peft)
    del peft
    if not reusable:
        _call(item, lambda: unsloth_model_cache.evict_model(loaded_4bit_model))


def _empty_module(module: Any) -> None:
    """Drop a finished wrapper module's references to the model it wrapped.

    Submodules, parameters and buffers, plus bound methods kept as attributes (peft keeps
    ``base_model_prepare_inputs_for_generation``, a method of the base model).
    """
    for store in ("_modules", "_parameters", "_buffers"):
        contents = getattr(module, store, None)
        if isinstance(contents, dict):
            contents.clear()
    attributes = getattr(module, "__dict__", {})
    for name, value in list(attributes.items()):
        if isinstance(value, types.MethodType):
            del attributes[name]
