"""Every option of the plugin, declared once and resolved once into a frozen ``Settings``.

Order: command line, then ini (``[tool.pytest.ini_options]`` and friends), then the default.
Bad command-line values are argparse errors (``type=`` functions); bad ini values are
``pytest.UsageError`` naming the key, the value, the file and the fix.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import re
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import pytest

from pytest_unsloth.util.units import GIB

GROUP = "unsloth"
MAX_BYTES = 1024**6
# Bounds that keep user numbers inside what time.monotonic/select and C ints accept.
MAX_SECONDS = 7 * 24 * 3600.0
MAX_INT = 2**31 - 1

CHECKS_SEPARATOR = re.compile(r"[,\s]+")
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
# Decimal units are converted exactly (1 GB = 10^9 bytes), binary ones as written.
_UNITS = {
    "": GIB,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_amount_bytes(value: object) -> int:
    """Parse a memory amount: a number means GiB; strings may carry a unit ("16GB", "16000MiB")."""
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not an amount of memory")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = _AMOUNT.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{_show(value)} is not an amount of memory; write a number of GiB (16) or a "
                "number with a unit: 16GiB, 16GB, 16000MiB"
            )
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError(f"{_show(value)} is not an amount of memory")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{_show(value)} is not a non-negative amount of memory")
    amount = number * _UNITS[unit]
    # int(inf) raises OverflowError, which argparse and the ini reader would not turn into a
    # usage error; no GPU has anywhere near 1 EiB, so larger amounts are typos.
    if not math.isfinite(amount) or amount > MAX_BYTES:
        raise ValueError(f"{_show(value)} is more than 1 EiB, not an amount of GPU memory")
    return int(amount)


# ----------------------------------------------------------------------------------------------
# Value parsers shared by the CLI (argparse ``type=``) and the ini reader.


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{_show(text)} is not a number") from None


def _must_be(text: str, ok: bool, what: str) -> None:
    """Raise the parsers' one error shape: "'x' is not WHAT"."""
    if not ok:
        raise ValueError(f"{_show(text)} is not {what}")


def _positive_float(text: str) -> float:
    value = _float(text)
    _must_be(text, math.isfinite(value) and value > 0, "a positive number")
    if value > MAX_SECONDS:
        # subprocess/select overflow on huge timeouts ("timestamp too large").
        raise ValueError(f"{_show(text)} is more than a week ({MAX_SECONDS:.0f} s)")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    _must_be(text, math.isfinite(value) and value >= 0, "a non-negative number")
    return value + 0.0  # -0.0 becomes 0.0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{_show(text)} is not a whole number") from None
    _must_be(text, value >= 1, "a positive integer")
    if value > MAX_INT:
        raise ValueError(f"{_show(text)} is too large (at most {MAX_INT})")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    _must_be(text, 0 < value <= 1, "a fraction in (0, 1]")
    return value


def _gib(text: str) -> float:
    return parse_amount_bytes(text) / GIB


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{_show(text)} is not a boolean (true/false)")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        low = text.strip().lower()
        if low not in choices:
            raise ValueError(f"{_show(text)} is not one of {', '.join(choices)}")
        return low

    parse.__name__ = "one of " + "/".join(choices)
    return parse


def _dtype(text: str) -> str | None:
    low = text.strip().lower()
    aliases = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if low in aliases:
        return aliases[low]
    if low in ("bfloat16", "float16", "float32"):
        return low
    raise ValueError(f"{_show(text)} is not a dtype (auto, bfloat16, float16, float32)")


def _argparse_type(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """Wrap a parser so argparse prints a clean usage error naming the option's expectation."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, ArithmeticError) as exc:
            raise argparse.ArgumentTypeError(f"{exc} (expected {what})") from None

    convert.__name__ = what
    return convert


def _split_words(text: str) -> tuple[str, ...]:
    return tuple(w for w in CHECKS_SEPARATOR.split(text.strip()) if w)


# ----------------------------------------------------------------------------------------------
# Option table: one row per setting, used for addoption/addini and for resolution.


# What a row that states no default gets, by kind: a flag is off, a list or a table is empty,
# a single value is unset.
_KIND_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "value": None,
        "flag": False,
        "args": (),
        "linelist": (),
        "table": MappingProxyType({}),
    }
)
_BY_KIND: Any = object()


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its field, CLI flag and ini key (either may be absent), parser and help.

    A row states what is particular to it; the rest follows from its kind. ``table``: 'key =
    value' lines or a TOML table, read into a mapping. A flag's ini key reads true or false.
    """

    field: str
    help: str
    ini: str | None = None
    cli: str | None = None
    kind: str = "value"  # value | flag | linelist | args | table
    parse: Callable[[str], Any] | None = None
    what: str = "a value"
    default: Any = _BY_KIND

    def __post_init__(self) -> None:
        if self.default is _BY_KIND:
            object.__setattr__(self, "default", _KIND_DEFAULTS[self.kind])
        if self.kind == "flag" and self.ini:
            object.__setattr__(self, "parse", _bool)
            object.__setattr__(self, "what", "true or false")


OPTIONS: tuple[Option, ...] = (
    Option(
        "env",
        "run the environment checks as unsloth-env::NAME items",
        cli="--unsloth-env",
        kind="flag",
    ),
    Option(
        "require",
        "packages that must be installed (distribution names)",
        ini="unsloth_require",
        cli="--unsloth-require",
        kind="args",
    ),
    Option(
        "pins",
        "extra pins to enforce, PEP 440 requirement strings (one per line)",
        ini="unsloth_pins",
        kind="linelist",
    ),
    Option(
        "checks",
        "check selection: names to run, or -NAME to leave one out (comma or space separated)",
        ini="unsloth_checks",
        cli="--unsloth-checks",
        kind="args",
    ),
    Option(
        "probe_timeout",
        "seconds each probe subprocess may run before it is killed",
        ini="unsloth_probe_timeout",
        cli="--unsloth-probe-timeout",
        parse=_positive_float,
        what="a positive number of seconds",
        default=300.0,
    ),
    Option(
        "min_free_vram_gib",
        "free GPU memory each visible GPU must have (GiB, or with a unit: 16GB, 16000MiB)",
        ini="unsloth_min_free_vram",
        cli="--unsloth-min-free-vram",
        parse=_gib,
        what="an amount of memory such as 16, 16GiB or 16000MiB",
    ),
    Option(
        "report_path",
        "write a JSON report of the checks to this path",
        ini="unsloth_report",
        cli="--unsloth-report",
        parse=str,
        what="a file path",
    ),
    Option(
        "require_gpu",
        "fail (not skip) the GPU checks when no usable NVIDIA GPU is found",
        ini="unsloth_require_gpu",
        cli="--unsloth-require-gpu",
        kind="flag",
    ),
    Option(
        "strict_skips",
        "requires_* markers fail instead of skipping (for dedicated GPU lanes)",
        ini="unsloth_strict_skips",
        cli="--unsloth-strict-skips",
        kind="flag",
    ),
    Option(
        "gpus_per_worker",
        "with xdist -n N: pin each worker to its own K GPUs",
        ini="unsloth_gpus_per_worker",
        cli="--unsloth-gpus-per-worker",
        parse=_positive_int,
        what="a positive integer",
    ),
    Option(
        "model",
        "model name or local path for loaded_4bit_model (default: a tiny offline model)",
        ini="unsloth_model",
        cli="--unsloth-model",
        parse=str,
        what="a model id or path",
    ),
    Option(
        "max_seq_length",
        "max_seq_length for model fixtures and the length budget",
        ini="unsloth_max_seq_length",
        parse=_positive_int,
        what="a positive integer",
        default=256,
    ),
    Option(
        "dtype",
        "compute dtype for model fixtures: auto, bfloat16, float16, float32",
        ini="unsloth_dtype",
        parse=_dtype,
        what="auto, bfloat16, float16 or float32",
    ),
    Option(
        "fast_inference",
        "load with unsloth's fast_inference (vLLM)",
        ini="unsloth_fast_inference",
        parse=_bool,
        what="true or false",
        default=False,
    ),
    Option(
        "gpu_memory_utilization",
        "gpu_memory_utilization passed to unsloth's loader",
        ini="unsloth_gpu_memory_utilization",
        parse=_fraction,
        what="a fraction in (0, 1]",
        default=0.5,
    ),
    Option(
        "allow_download",
        "let model fixtures reach the Hugging Face Hub (offline by default)",
        ini="unsloth_allow_download",
        cli="--unsloth-allow-download",
        kind="flag",
    ),
    Option(
        "import_first",
        "import unsloth at configure time (before transformers/trl/peft) when a GPU is present",
        ini="unsloth_import_first",
        cli="--unsloth-import-first",
        kind="flag",
    ),
    Option(
        "lora_r",
        "LoRA rank for peft_model",
        ini="unsloth_lora_r",
        parse=_positive_int,
        what="a positive integer",
        default=8,
    ),
    Option(
        "lora_alpha",
        "LoRA alpha for peft_model",
        ini="unsloth_lora_alpha",
        parse=_positive_int,
        what="a positive integer",
        default=16,
    ),
    Option(
        "lora_dropout",
        "LoRA dropout for peft_model",
        ini="unsloth_lora_dropout",
        parse=_non_negative_float,
        what="a number in [0, 1)",
        default=0.0,
    ),
    Option(
        "lora_target_modules",
        "LoRA target modules for peft_model",
        ini="unsloth_lora_target_modules",
        kind="args",
        default=("q_proj", "k_proj", "v_proj", "o_proj"),
    ),
    Option(
        "gradient_checkpointing",
        "gradient checkpointing for peft_model: unsloth, true, false",
        ini="unsloth_gradient_checkpointing",
        parse=_choice("unsloth", "true", "false"),
        what="unsloth, true or false",
        default="unsloth",
    ),
    Option(
        "reward_funcs",
        "reward functions to check, as import paths pkg.module:func",
        ini="unsloth_reward_funcs",
        kind="args",
    ),
    Option(
        "dataset",
        "JSONL dataset file to check",
        ini="unsloth_dataset",
        parse=str,
        what="a file path",
    ),
    Option(
        "dataset_schema",
        "dataset schema: instruction, prompt, messages (default: detect)",
        ini="unsloth_dataset_schema",
        parse=_choice("instruction", "prompt", "messages"),
        what="instruction, prompt or messages",
    ),
    Option(
        "tokenizer",
        "tokenizer or model folder for the length budget",
        ini="unsloth_tokenizer",
        parse=str,
        what="a folder path",
    ),
    Option(
        "grpo_config",
        "GRPOConfig settings to validate, one 'key = value' per line",
        ini="unsloth_grpo_config",
        kind="table",
    ),
    Option(
        "reprobe",
        "ignore remembered probe results and probe again",
        cli="--unsloth-reprobe",
        kind="flag",
    ),
    Option(
        "probe_cache_max_age_hours",
        "hours a passing probe result is reused between runs (0 disables reuse)",
        ini="unsloth_probe_cache_max_age",
        parse=_non_negative_float,
        what="a number of hours",
        default=24.0,
    ),
    Option(
        "min_shm_gib",
        "size /dev/shm must have inside a container (dataloader workers, NCCL); GiB or a unit",
        ini="unsloth_min_shm",
        cli="--unsloth-min-shm",
        parse=_gib,
        what="an amount of memory such as 1, 1GiB or 2048MiB",
        default=1.0,
    ),
    Option(
        "min_free_disk_gib",
        "free disk the Hub cache and the output directory must have (GiB or a unit); with "
        "unsloth_model, the model's size decides",
        ini="unsloth_min_free_disk",
        cli="--unsloth-min-free-disk",
        parse=_gib,
        what="an amount of disk such as 20, 20GiB or 50GB",
        default=10.0,
    ),
    Option(
        "nccl_timeout",
        "seconds one NCCL attempt (all ranks: start, init, all_reduce, P2P copy) may take",
        ini="unsloth_nccl_timeout",
        cli="--unsloth-nccl-timeout",
        parse=_positive_float,
        what="a positive number of seconds",
        default=60.0,
    ),
    Option(
        "target_arch",
        "GPU architectures the compiled extensions must run on, checked without a GPU "
        "(sm_90 sm_120 ...)",
        ini="unsloth_target_arch",
        cli="--unsloth-target-arch",
        kind="args",
    ),
    Option(
        "fit_target_gib",
        "memory the fit check compares its estimate with when no GPU is visible (24GiB)",
        ini="unsloth_fit_target",
        cli="--unsloth-fit-target",
        parse=_gib,
        what="an amount of memory such as 24, 24GiB or 24000MiB",
    ),
    Option(
        "fit_settings",
        "extra settings for the fit estimate, one 'key = value' per line (task, stack, "
        "load_in_4bit, optim, per_device_train_batch_size, ...)",
        ini="unsloth_fit_settings",
        kind="table",
    ),
)


def _from_table(field: str) -> Any:
    """A ``Settings`` field whose default is the one its row in ``OPTIONS`` gives."""
    default = next(opt.default for opt in OPTIONS if opt.field == field)
    if type(default).__hash__ is None:  # a mapping: read-only, but dataclasses refuse it as is
        return dataclasses.field(default_factory=lambda: default)
    return dataclasses.field(default=default)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The plugin's resolved configuration (see ``OPTIONS`` for what each field means).

    Defaults come from ``OPTIONS``; a field here only names the setting and its type.
    """

    env: bool = _from_table("env")
    require: tuple[str, ...] = _from_table("require")
    pins: tuple[str, ...] = _from_table("pins")
    checks: tuple[str, ...] = _from_table("checks")
    probe_timeout: float = _from_table("probe_timeout")
    min_free_vram_gib: float | None = _from_table("min_free_vram_gib")
    report_path: str | None = _from_table("report_path")
    require_gpu: bool = _from_table("require_gpu")
    strict_skips: bool = _from_table("strict_skips")
    gpus_per_worker: int | None = _from_table("gpus_per_worker")
    model: str | None = _from_table("model")
    max_seq_length: int = _from_table("max_seq_length")
    dtype: str | None = _from_table("dtype")
    fast_inference: bool = _from_table("fast_inference")
    gpu_memory_utilization: float = _from_table("gpu_memory_utilization")
    allow_download: bool = _from_table("allow_download")
    import_first: bool = _from_table("import_first")
    lora_r: int = _from_table("lora_r")
    lora_alpha: int = _from_table("lora_alpha")
    lora_dropout: float = _from_table("lora_dropout")
    lora_target_modules: tuple[str, ...] = _from_table("lora_target_modules")
    gradient_checkpointing: str = _from_table("gradient_checkpointing")
    reward_funcs: tuple[str, ...] = _from_table("reward_funcs")
    dataset: str | None = _from_table("dataset")
    dataset_schema: str | None = _from_table("dataset_schema")
    tokenizer: str | None = _from_table("tokenizer")
    grpo_config: Mapping[str, object] = _from_table("grpo_config")
    reprobe: bool = _from_table("reprobe")
    probe_cache_max_age_hours: float = _from_table("probe_cache_max_age_hours")
    min_shm_gib: float = _from_table("min_shm_gib")
    min_free_disk_gib: float = _from_table("min_free_disk_gib")
    nccl_timeout: float = _from_table("nccl_timeout")
    target_arch: tuple[str, ...] = _from_table("target_arch")
    fit_target_gib: float | None = _from_table("fit_target_gib")
    fit_settings: Mapping[str, object] = _from_table("fit_settings")
    sources: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def source(self, field: str) -> str:
        """Where a value came from: a CLI flag, an ini key with its file, or "default"."""
        return self.sources.get(field, "default")


SETTINGS_KEY = pytest.StashKey[Settings]()


def _metavar(what: str) -> str:
    """The help's placeholder: the last word of ``what``; an example value keeps its case."""
    word = what.split()[-1]
    # "16000MiB" is an example to copy, and MIB is not a unit; "seconds" is a name: SECONDS.
    return word if any(c.isdigit() for c in word) else word.upper()


def addoptions(parser: pytest.Parser) -> None:
    """Declare every CLI flag and ini key (called from pytest_addoption)."""
    group = parser.getgroup(GROUP, "unsloth: fine-tuning environment checks")
    for opt in OPTIONS:
        if opt.cli:
            if opt.kind == "flag":
                group.addoption(opt.cli, action="store_true", default=None, help=opt.help)
            elif opt.kind == "args":
                group.addoption(
                    opt.cli,
                    action="append",
                    default=None,
                    metavar="NAMES",
                    help=opt.help + " (repeatable)",
                )
            else:
                assert opt.parse is not None
                group.addoption(
                    opt.cli,
                    default=None,
                    type=_argparse_type(opt.parse, opt.what),
                    metavar=_metavar(opt.what),
                    help=opt.help,
                )
        if opt.ini:
            ini_type = {
                "flag": "string",
                "value": "string",
                "linelist": "linelist",
                "args": "args",
                "table": "linelist",
            }[opt.kind]
            parser.addini(opt.ini, opt.help, type=ini_type, default=None)  # type: ignore[arg-type]


def _ini_where(config: pytest.Config, key: str) -> str:
    where = f"ini {key}"
    if config.inipath is not None:
        where += f" in {config.inipath.name}"
    return where


_MISSING: Any = object()


def _show(value: object) -> str:
    """``repr`` for messages: bounded, and safe for integers too long for ``repr``."""
    try:
        text = repr(value)
    except ValueError:  # int with more digits than sys.get_int_max_str_digits()
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "<?>"
    return text if len(text) <= 120 else text[:100] + "...(" + str(len(text)) + " chars)"


def _kind_of(value: object) -> str:
    """What a TOML value is, in the words of the TOML spec."""
    import datetime

    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (bool, "a boolean"),  # before int: a bool is an int to isinstance
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a table"),
        ((datetime.date, datetime.time), "a date/time"),
    )
    for classes, kind in kinds:
        if isinstance(value, classes):
            return kind
    return f"a {type(value).__name__}"


def _what(opt: Option) -> str:
    if opt.kind == "table":
        return "'key = value' lines (a TOML list of strings, or a table)"
    if opt.kind == "args":
        return "names separated by spaces or commas (or a TOML list of strings)"
    if opt.kind == "linelist":
        return "one entry per line (or a TOML list of strings)"
    return opt.what


def _fix_where(config: pytest.Config, key: str, where: str) -> str:
    if where.startswith("-o "):
        return f"set -o {key}"
    if config.inipath is not None:
        return f"set {key} in {config.inipath}"
    return f"set {key}"


def _ini_error(
    config: pytest.Config,
    opt: Option,
    raw: object,
    problem: str,
    where: str | None = None,
) -> pytest.UsageError:
    assert opt.ini is not None
    where = where or _ini_where(config, opt.ini)
    return pytest.UsageError(
        f"pytest-unsloth: {where} = {_show(raw)}: {problem}. "
        f"Fix: {_fix_where(config, opt.ini, where)} to {_what(opt)}."
    )


def _toml_table(config: pytest.Config) -> Mapping[str, object]:
    """The ini keys as the TOML file wrote them (native types), when the ini file is TOML.

    pytest 8 and ``[tool.pytest.ini_options]`` turn scalars into strings (a table becomes
    "{'a': 1}"), pytest 9's ``[tool.pytest]`` keeps native types and raises TypeError from
    ``getini`` for a mismatch; reading the file gives one behaviour on both.
    """
    path = config.inipath
    if path is None or path.suffix != ".toml":
        return {}
    try:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - pytest depends on tomli below 3.11
            import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except Exception:  # pytest parsed it already; anything odd falls back to getini
        return {}
    if path.name in ("pytest.toml", ".pytest.toml"):
        table = data.get("pytest")
    else:
        tool = data.get("tool")
        tool = tool.get("pytest") if isinstance(tool, dict) else None
        if not isinstance(tool, dict):
            return {}
        table = tool.get("ini_options")
        if not isinstance(table, dict):
            table = {k: v for k, v in tool.items() if k != "ini_options"}
    return table if isinstance(table, dict) else {}


def _overridden(config: pytest.Config, key: str) -> bool:
    items = getattr(config.option, "override_ini", None) or ()
    return any(str(item).partition("=")[0].strip() == key for item in items)


def _getini(config: pytest.Config, opt: Option, where: str, native: bool = False) -> object:
    """``config.getini`` with pytest's own errors (bad quoting, TOML type) as usage errors.

    With ``native`` (the key is in a TOML file we read ourselves) an error only means pytest
    saw a value it would not coerce: return ``_MISSING`` so the native value is used.
    """
    assert opt.ini is not None
    try:
        return config.getini(opt.ini)
    except (TypeError, ValueError, pytest.UsageError) as exc:
        # pytest 9.2+ checks TOML types itself and raises UsageError; older ones TypeError.
        if native:
            return _MISSING
        raise pytest.UsageError(
            f"pytest-unsloth: {where}: pytest cannot read it ({exc}). "
            f"Fix: {_fix_where(config, opt.ini, where)} to {_what(opt)}."
        ) from None


def _read_ini(
    config: pytest.Config, opt: Option, table: Mapping[str, object]
) -> tuple[object, str]:
    """The raw ini value (native TOML type when the file is TOML) and where it came from."""
    assert opt.ini is not None
    if _overridden(config, opt.ini):
        where = f"-o {opt.ini} (--override-ini)"
        return _getini(config, opt, where), where
    where = _ini_where(config, opt.ini)
    if opt.ini not in table:
        return _getini(config, opt, where), where
    # Ask pytest first: a table it does not read (pytest 8 ignores [tool.pytest]) stays unset.
    seen = _getini(config, opt, where, native=True)
    if seen is not _MISSING and _unset(seen):
        return seen, where
    return table[opt.ini], where


def _strings(config: pytest.Config, opt: Option, raw: object, where: str) -> list[str]:
    """A list-valued key as strings: one string (split later) or a list of strings."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list):
        raise _ini_error(config, opt, raw, f"it is {_kind_of(raw)}", where)
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise _ini_error(
                config,
                opt,
                raw,
                f"item {i} ({_show(item)}) is {_kind_of(item)}, not a string",
                where,
            )
    return list(raw)


def _scalar_text(config: pytest.Config, opt: Option, raw: object, where: str) -> str:
    """A single-valued key as the text its parser reads; native numbers/booleans where they fit."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bool):
        if opt.parse is _bool:
            return "true" if raw else "false"
    elif isinstance(raw, (int, float)) and opt.parse in _NUMERIC_PARSERS:
        try:
            return repr(raw)
        except ValueError:  # an integer too long to print is too large for any setting
            raise _ini_error(config, opt, raw, "it is far too large", where) from None
    raise _ini_error(config, opt, raw, f"it is {_kind_of(raw)}", where)


_NUMERIC_PARSERS: tuple[Callable[[str], Any], ...] = (
    _positive_float,
    _non_negative_float,
    _positive_int,
    _fraction,
    _gib,
)

# A GRPO value that is not a Python literal may be a bare word (``linear``, ``./out``); anything
# else (``= 4``, ``import os``) is a typo that would otherwise reach GRPOConfig as a string.
_BARE_WORD = re.compile(r"^[A-Za-z_./~][\w./:+-]*$")


def _grpo_value(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return text if _BARE_WORD.match(text) else _MISSING


def _parse_table(
    config: pytest.Config, opt: Option, raw: object, where: str
) -> Mapping[str, object]:
    """``unsloth_grpo_config`` / ``unsloth_fit_settings``: 'key = value' lines, or a TOML table."""
    fix = _fix_where(config, opt.ini or "unsloth_grpo_config", where)

    def error(problem: str) -> pytest.UsageError:
        return pytest.UsageError(
            f"pytest-unsloth: {where}: {problem}. Fix: {fix} to one GRPOConfig setting per "
            "line, e.g. 'num_generations = 4' (quote text with spaces: key = 'two words')."
        )

    result: dict[str, object] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            if not (isinstance(key, str) and key.isidentifier()):
                raise error(f"key {_show(key)} is not a GRPOConfig field name")
            result[key] = value
        return MappingProxyType(result)
    lines: list[str] = []
    for chunk in _strings(config, opt, raw, where):
        lines.extend(chunk.splitlines())
    seen: dict[str, str] = {}
    for line in lines:
        if not line.strip() or line.strip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise error(f"line {_show(line)} is not 'key = value'")
        text = value.strip()
        if not text:
            raise error(f"line {_show(line)} has no value after '='")
        parsed = _grpo_value(text)
        if parsed is _MISSING:
            raise error(
                f"line {_show(line)}: the value of {key} ({_show(text)}) is neither a Python "
                "literal (4, 5e-6, True, 'text', [1, 2]) nor a bare word"
            )
        if key in seen:
            raise error(f"{key} is set twice ({_show(seen[key])} and {_show(line)}); keep one")
        seen[key] = line
        result[key] = parsed
    return MappingProxyType(result)


def _convert(config: pytest.Config, opt: Option, raw: object, where: str) -> Any:
    """One ini value to the field's type, or a usage error naming key, value, source and fix."""
    if opt.kind == "table":
        return _parse_table(config, opt, raw, where)
    if opt.kind == "args":
        words = _strings(config, opt, raw, where)
        return tuple(w for item in words for w in _split_words(item))
    if opt.kind == "linelist":
        lines = [line for item in _strings(config, opt, raw, where) for line in item.splitlines()]
        return tuple(s.strip() for s in lines if s.strip())
    assert opt.parse is not None
    text = _scalar_text(config, opt, raw, where)
    try:
        return opt.parse(text)
    except (ValueError, ArithmeticError) as exc:
        problem = str(exc)
        if problem.startswith(_show(text)):  # the value is already shown once
            problem = "it" + problem[len(_show(text)) :]
        raise _ini_error(config, opt, text, problem, where) from None


def _unset(raw: object) -> bool:
    return raw is None or (isinstance(raw, (str, list, dict)) and not raw)


def resolve(config: pytest.Config) -> Settings:
    """Resolve every option once (CLI > ini > default); raise UsageError for a bad ini value."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    table = _toml_table(config)
    for opt in OPTIONS:
        cli_value = config.getoption(opt.cli) if opt.cli else None
        if opt.cli and cli_value is not None:
            if opt.kind == "args":
                cli_value = tuple(w for chunk in cli_value for w in _split_words(chunk))
            values[opt.field] = cli_value
            sources[opt.field] = opt.cli
            continue
        if not opt.ini:
            continue
        raw, where = _read_ini(config, opt, table)
        if _unset(raw):
            continue
        sources[opt.field] = where
        values[opt.field] = _convert(config, opt, raw, where)
    settings = Settings(**values, sources=MappingProxyType(sources))
    _validate(config, settings)
    return settings


def _validate(config: pytest.Config, settings: Settings) -> None:
    """Cross-field and content checks that need more than one value's parser."""
    if settings.pins:
        from packaging.requirements import InvalidRequirement, Requirement

        for pin in settings.pins:
            try:
                Requirement(pin)
            except InvalidRequirement as exc:
                raise pytest.UsageError(
                    f"pytest-unsloth: {settings.source('pins')}: {pin!r} is not a PEP 440 "
                    f"requirement ({exc}). Fix: write e.g. 'trl>=0.20,<2'."
                ) from None
    if settings.require:
        bad = [r for r in settings.require if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r)]
        if bad:
            raise pytest.UsageError(
                f"pytest-unsloth: {settings.source('require')}: {bad[0]!r} is not a distribution "
                "name. Fix: list names only (e.g. 'unsloth trl'); put version ranges in "
                "unsloth_pins."
            )
    for name in settings.reward_funcs:
        if ":" not in name or not all(p for p in name.split(":", 1)):
            raise pytest.UsageError(
                f"pytest-unsloth: {settings.source('reward_funcs')}: {name!r} is not an import "
                "path. Fix: write 'package.module:function', e.g. 'rewards:format_reward'."
            )
    for arch in settings.target_arch:
        from pytest_unsloth.compat.archs import parse_capability

        try:
            parse_capability(arch)
        except ValueError as exc:
            raise pytest.UsageError(
                f"pytest-unsloth: {settings.source('target_arch')}: {exc}. Fix: e.g. "
                "unsloth_target_arch = sm_90 sm_120 (or --unsloth-target-arch=sm_120)."
            ) from None
    if settings.fit_settings:
        from pytest_unsloth.fit.estimate import normalize_settings

        try:
            normalize_settings(settings.fit_settings)
        except ValueError as exc:
            raise pytest.UsageError(
                f"pytest-unsloth: {settings.source('fit_settings')}: {exc}. Fix: use the "
                "names and values of python -m pytest_unsloth.fit --help."
            ) from None
    if settings.lora_dropout >= 1:
        raise pytest.UsageError(
            f"pytest-unsloth: {settings.source('lora_dropout')} = {settings.lora_dropout}: "
            "dropout must be below 1. Fix: use a value such as 0.05."
        )


def get_settings(config: pytest.Config) -> Settings:
    """Return the settings resolved at configure time (resolving them now if needed)."""
    settings = config.stash.get(SETTINGS_KEY, None)
    if settings is None:
        settings = resolve(config)
        config.stash[SETTINGS_KEY] = settings
    return settings


def options_markdown() -> str:
    """The configuration reference table in README.md (a test keeps the two identical)."""
    rows = ["| ini key | command line | default | meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        default = opt.default
        if isinstance(default, Mapping):
            default = dict(default) or None
        if isinstance(default, tuple):
            default = " ".join(default) or None
        if opt.kind == "flag":
            shown = "off"
        elif default is None:
            shown = "—"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default}`"
        ini = f"`{opt.ini}`" if opt.ini else "—"
        cli = f"`{opt.cli}`" if opt.cli else "—"
        rows.append(f"| {ini} | {cli} | {shown} | {opt.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m pytest_unsloth.settings: print the reference table
    print(options_markdown(), end="")
