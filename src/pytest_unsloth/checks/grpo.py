"""``--unsloth-env`` checks of the GRPO setup: reward functions, length budget, config, dataset.

Each check reads its part of the user's setup from the ini keys, skips (naming the key) when that
part is not configured, and fails with found / why / fix lines. They run in the pytest process
and import TRL or transformers only when configured.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import json
import os
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.registry import builtin_check
from pytest_unsloth.probes import stage
from pytest_unsloth.util.timelimit import ThreadCall

if TYPE_CHECKING:
    from pytest_unsloth.grpo.problems import Problem
    from pytest_unsloth.probes.protocol import ProbeResult
    from pytest_unsloth.settings import Settings

__all__ = ["dataset_check", "grpo_config_check", "length_budget_check", "reward_funcs_check"]

# Rows of the dataset file used to call reward functions in the dataset's own shape, and the
# rows they are chosen from (so every task of a multi-task dataset is seen).
_REWARD_ROWS = 4
_REWARD_WINDOW = 256
_INDENT = "\n       "


def _fail(failures: list[tuple[str, Problem]]) -> CheckFailed:
    """Fold several findings into one three-part failure; one finding keeps its own lines."""
    if len(failures) == 1:
        name, p = failures[0]
        prefix = f"{name}: " if name not in ("", "*") else ""
        return CheckFailed(found=prefix + p.found, why=p.why, fix=p.fix)
    found = [f"{len(failures)} problems:"]
    whys: list[str] = []
    fixes: list[str] = []
    for i, (name, p) in enumerate(failures, 1):
        prefix = f"{name}: " if name not in ("", "*") else ""
        found.append(f"{i}) {prefix}{p.found}")
        if p.why not in whys:
            whys.append(p.why)
        fixes.append(f"{i}) {p.fix}")
    return CheckFailed(found=_INDENT.join(found), why=_INDENT.join(whys), fix=_INDENT.join(fixes))


def _raise_errors(problems: Iterable[Problem]) -> None:
    """Fail with every finding of severity error, if there is one."""
    failures = [("", p) for p in problems if p.severity == "error"]
    if failures:
        raise _fail(failures)


def _warnings(problems: Iterable[Problem]) -> list[str]:
    """What the findings of severity warning found (shown after a pass)."""
    return [p.found for p in problems if p.severity == "warning"]


def _resolve(ctx: CheckContext, value: str) -> Path:
    """Resolve an ini path against the rootdir."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else ctx.rootpath / path


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """Let ``pkg.module`` import from the rootdir while the check runs."""
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def import_object(spec: str, rootpath: Path, source: str) -> Any:
    """Import ``pkg.module:attr`` from the rootdir; CheckFailed names the path and the error."""
    module_name, _, attr_path = spec.partition(":")
    with _on_sys_path(rootpath):
        try:
            obj: Any = importlib.import_module(module_name)
        # SystemExit or KeyboardInterrupt raised by the module's top level are its own doing:
        # this runs in the check's child process, which no terminal Ctrl-C reaches.
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            what = f"{type(exc).__name__}: {exc}".rstrip(": ")
            exits = isinstance(exc, SystemExit | KeyboardInterrupt)
            raise CheckFailed(
                found=f"cannot import {module_name!r} for {spec!r} ({source}): {what}",
                why="importing the module "
                + (
                    f"raises {type(exc).__name__} at its top level, which ends the training "
                    "script that imports it"
                    if exits
                    else "fails"
                )
                + "; the reward functions must be importable before GRPOTrainer can call them",
                fix=(
                    "move the code that exits under `if __name__ == '__main__':`"
                    if exits
                    else f"fix the error above, or the module path (resolved from {rootpath} "
                    "and sys.path)"
                ),
            ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = _defined_callables(obj)
            close = difflib.get_close_matches(part, names, n=3)
            listing = ", ".join(close + [n for n in names if n not in close])
            raise CheckFailed(
                found=f"{module_name!r} has no attribute {part!r} (for {spec!r}, {source})",
                why="the import path must name the reward function itself",
                fix="check the spelling; "
                + (
                    f"{getattr(obj, '__name__', module_name)} defines: {listing[:200]}"
                    if names
                    else f"{getattr(obj, '__name__', module_name)} defines no functions"
                ),
            ) from None
    return obj


def _defined_callables(obj: Any) -> list[str]:
    """Public functions and callable objects defined in module ``obj`` itself (not imported)."""
    if not isinstance(obj, types.ModuleType):
        return [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    out = []
    for name, value in vars(obj).items():
        if name.startswith("_") or isinstance(value, types.ModuleType | type):
            continue
        # Functions name their module; callable objects (a partial, a scorer instance) made at
        # module level do not, and are rarely imported, so they count as defined here.
        if inspect.isroutine(value) and getattr(value, "__module__", None) != obj.__name__:
            continue
        if callable(value):
            out.append(name)
    return out


def _read_rows(path: Path, count: int | None) -> Iterator[dict[str, Any]]:
    """Yield the valid JSON objects of a JSONL file (the dataset check reports the bad lines)."""
    seen = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if count is not None and seen >= count:
                return
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                seen += 1
                yield row


def _dataset_path(ctx: CheckContext) -> Path | None:
    """The configured dataset file, or None; CheckFailed when it does not exist."""
    if not ctx.settings.dataset:
        return None
    path = _resolve(ctx, ctx.settings.dataset)
    if not path.is_file():
        raise CheckFailed(
            found=f"{ctx.settings.source('dataset')} = {ctx.settings.dataset!r}: no such file "
            f"({path})",
            why="the dataset checks need the training file",
            fix="point unsloth_dataset at the JSONL file (relative to the rootdir)",
        )
    return path


def _num_generations(ctx: CheckContext) -> int:
    """num_generations from unsloth_grpo_config, else 2 (enough to see the repeat shape)."""
    value = ctx.settings.grpo_config.get("num_generations")
    return value if isinstance(value, int) and 1 <= value <= 64 else 2


@builtin_check(
    "reward-funcs",
    layer="grpo",
    description="reward functions follow TRL's calling contract",
)
def reward_funcs_check(ctx: CheckContext) -> str | None:
    """Import the configured reward functions and call them the way the installed TRL does."""
    return _in_child("reward-funcs", ctx)


def _call_timeout(ctx: CheckContext) -> float:
    """Time limit of one reward call in the child: a share of the whole check's limit."""
    return max(1.0, min(30.0, ctx.settings.probe_timeout / 3))


def _reward_funcs_body(ctx: CheckContext) -> str | None:
    """The reward-funcs check, run in the child process."""
    settings = ctx.settings
    source = settings.source("reward_funcs")
    from pytest_unsloth.grpo.problems import Problem
    from pytest_unsloth.grpo.rewards import check_reward_funcs

    # Import every path first, so one typo does not hide the other functions' problems.
    funcs: list[Any] = []
    specs: list[str] = []
    import_failures: list[tuple[str, Problem]] = []
    for spec in settings.reward_funcs:
        stage(f"import {spec}")
        try:
            funcs.append(import_object(spec, ctx.rootpath, source))
            specs.append(spec)
        except CheckFailed as exc:
            import_failures.append(("", Problem(exc.found, exc.why, exc.fix, code="import")))

    rows: list[dict[str, Any]] | None = None
    note = ""
    path = _dataset_path(ctx)
    if path is not None:
        rows = list(_read_rows(path, _REWARD_WINDOW))
        if not rows or "prompt" not in rows[0]:
            note = f"; {path.name} has no 'prompt' field, so synthetic inputs were used"
            rows = None
    with _on_sys_path(ctx.rootpath):
        report = check_reward_funcs(
            funcs,
            rows,
            _num_generations(ctx),
            num_prompts=_REWARD_ROWS,
            timeout=_call_timeout(ctx),
        )
    names = dict(zip((r.name for r in report.results), specs, strict=False))
    failures = import_failures + [(names.get(n, n), p) for n, p in report.failures()]
    if failures:
        raise _fail(failures)
    warnings = _warnings(report.problems)
    warnings += [
        f"{names.get(r.name, r.name)}: {p.found}"
        for r in report.results
        for p in r.problems
        if p.severity == "warning"
    ]
    infos = sum(1 for r in report.results for p in r.problems if p.severity == "info")
    shapes = sorted({s for r in report.results for s in r.shapes})
    return (
        f"{len(report.results)} reward function(s) pass on {report.num_completions} "
        f"{'/'.join(shapes) or 'no'} completions, called as TRL "
        f"{report.contract.trl_version} does"
        + ("" if report.contract.source.startswith("read") else " (contract assumed)")
        + (f"; {infos} note(s)" if infos else "")
        + note
        + "".join(f"; warning: {w}" for w in warnings)
    )


def _load_tokenizer(ctx: CheckContext) -> Any:
    """Load the tokenizer named by unsloth_tokenizer (or a local unsloth_model folder)."""
    settings = ctx.settings
    key, value = "tokenizer", settings.tokenizer
    if not value and settings.model and _resolve(ctx, settings.model).is_dir():
        key, value = "model", settings.model
    if not value:
        raise CheckSkipped(
            "no tokenizer configured: set unsloth_tokenizer (a tokenizer or model folder) and "
            "unsloth_dataset"
        )
    path = _resolve(ctx, value)
    hub_shaped = (
        value.count("/") == 1 and not value.startswith((".", "/", "~")) and "\\" not in value
    )
    if not path.exists() and not hub_shaped:
        raise CheckFailed(
            found=f"{settings.source(key)} = {value!r}: no such folder ({path})",
            why="the length budget is measured with the model's own tokenizer and chat "
            "template, loaded from that folder",
            fix="point unsloth_tokenizer at a local folder with tokenizer.json (relative to the "
            "rootdir)",
        )
    target = str(path) if path.exists() else value
    stage(f"load the tokenizer {value}")
    try:
        from pytest_unsloth.models import tiny

        if path.is_dir() and tiny.is_tiny_model(path):
            return tiny.load_tokenizer(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(target, local_files_only=not settings.allow_download)
    except Exception as exc:
        if not path.exists() and not settings.allow_download:
            # Offline: transformers' "couldn't connect to huggingface.co" would mislead.
            raise CheckFailed(
                found=f"{settings.source(key)} = {value!r}: no such folder ({path}), and no "
                "Hub model of that id in the local Hugging Face cache",
                why="the length budget is measured with the model's own tokenizer and chat "
                "template; downloads are off, so the Hub is not asked",
                fix="point unsloth_tokenizer at a local folder with tokenizer.json, or set "
                "unsloth_allow_download = true to fetch this Hub id",
            ) from None
        raise CheckFailed(
            found=f"cannot load the tokenizer {value!r} ({settings.source(key)}): "
            f"{type(exc).__name__}: {str(exc)[:300]}",
            why="the length budget is measured with the model's own tokenizer and chat template",
            fix="point unsloth_tokenizer at a local folder with tokenizer.json (or set "
            "unsloth_allow_download = true for a Hub id)",
        ) from None


def _require(ctx: CheckContext, dists: tuple[str, ...], key: str, what: str) -> None:
    """Fail in three lines when a configured part needs a package that is not installed."""
    missing = [d for d in dists if ctx.dist(d) is None]
    if missing:
        raise CheckFailed(
            found=f"{ctx.settings.source(key)} is set, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed",
            why=f"{what} needs {', '.join(missing)}, and so does the training run it describes",
            fix="pip install " + " ".join(missing),
        )


@builtin_check(
    "length-budget",
    layer="grpo",
    description="prompt + completion fit the sequence budget",
)
def length_budget_check(ctx: CheckContext) -> str | None:
    """Measure every prompt of the dataset after the chat template against the length limit."""
    return _in_child("length-budget", ctx)


def _length_budget_body(ctx: CheckContext) -> str | None:
    """The length-budget check, run in the child process."""
    settings = ctx.settings
    path = _dataset_path(ctx)
    assert path is not None
    _require(
        ctx,
        ("transformers", "tokenizers"),
        "dataset",
        "measuring prompts with the model's tokenizer and chat template",
    )
    tokenizer = _load_tokenizer(ctx)
    stage(f"measure the prompts of {path.name}")
    from pytest_unsloth.grpo.budget import check_length_budget

    config = dict(settings.grpo_config)
    try:
        report = check_length_budget(
            tokenizer,
            _read_rows(path, None),
            # unsloth_max_seq_length when set; else the model's own context, not our default.
            max_seq_length=_model_context(ctx) or settings.max_seq_length,
            config=config,
        )
    except Exception as exc:  # a tokenizer or template error is this check's finding
        raise CheckFailed(
            found=f"measuring the prompts of {path.name} failed: {type(exc).__name__}: "
            f"{str(exc)[:300]}",
            why="GRPOTrainer tokenizes the same prompts the same way at its first step",
            fix="check the tokenizer's chat_template against the dataset's prompt format",
        ) from None
    _raise_errors(report.problems)
    return report.summary() + "".join(f"; warning: {w}" for w in _warnings(report.problems))


def _model_context(ctx: CheckContext) -> int | None:
    """The context the model is loaded with: unsloth_max_seq_length when set, else config.json's."""
    settings = ctx.settings
    if settings.source("max_seq_length") != "default":
        return settings.max_seq_length
    for folder in (settings.model, settings.tokenizer):
        if not folder:
            continue
        config = _resolve(ctx, folder) / "config.json"
        if config.is_file():
            with contextlib.suppress(ValueError, OSError):
                value = json.loads(config.read_text(encoding="utf-8")).get(
                    "max_position_embeddings"
                )
                if isinstance(value, int):
                    return value
    return None


@builtin_check("grpo-config", layer="grpo", description="GRPO settings build a valid GRPOConfig")
def grpo_config_check(ctx: CheckContext) -> str | None:
    """Build GRPOConfig from unsloth_grpo_config; check GPU bf16, vLLM, unsloth, context."""
    return _in_child("grpo-config", ctx)


def _grpo_config_body(ctx: CheckContext) -> str | None:
    """The grpo-config check, run in the child process."""
    settings = ctx.settings
    _require(ctx, ("trl",), "grpo_config", "validating the settings with TRL's own GRPOConfig")
    from pytest_unsloth.grpo.config import check_grpo_config

    snapshot = ctx.nvml
    stage("build GRPOConfig")
    report = check_grpo_config(
        dict(settings.grpo_config),
        gpus=snapshot if getattr(snapshot, "available", False) else None,
        model_max_length=_model_context(ctx),
        unsloth=ctx.dist("unsloth") is not None,
    )
    _raise_errors(report.problems)
    warnings = _warnings(report.problems)
    return report.summary() + ("; warning: " + "; ".join(warnings) if warnings else "")


@builtin_check("dataset", layer="grpo", description="dataset file is well-formed")
def dataset_check(ctx: CheckContext) -> str | None:
    """Stream the JSONL dataset and report every bad line by number."""
    return _in_child("dataset", ctx)


def _dataset_body(ctx: CheckContext) -> str | None:
    """The dataset check, run in the child process."""
    settings = ctx.settings
    path = _dataset_path(ctx)
    assert path is not None
    from pytest_unsloth.grpo.jsonl import check_jsonl

    stage(f"read {path.name}")
    report = check_jsonl(path, settings.dataset_schema)
    if report.problems:
        raise _fail([("", p) for p in report.problems])
    if report.bad_count:
        counts = report.counts()
        first = report.bad[:5]
        raise CheckFailed(
            found=f"{report.bad_count} defect(s) in {path.name} ({report.schema} schema): "
            + ", ".join(f"{n} {code}" for code, n in sorted(counts.items()))
            + _INDENT
            + _INDENT.join(f"line {p.line}: {p.message}" for p in first)
            + (
                _INDENT + f"... {report.bad_count - len(first)} more"
                if report.bad_count > 5
                else ""
            ),
            why="a bad line stops datasets.load_dataset or silently trains on broken text",
            fix="fix or drop the listed lines (run pytest_unsloth.check_jsonl(path) for the "
            "full list); save with '\\n' line endings and UTF-8",
        )
    return report.summary()


CHILD_BODIES: dict[str, Callable[[CheckContext], str | None]] = {
    "reward-funcs": _reward_funcs_body,
    "length-budget": _length_budget_body,
    "grpo-config": _grpo_config_body,
    "dataset": _dataset_body,
}

_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_REWARD_STAGE = "call reward function "


# Per GRPO check: is its part of the setup configured, and the skip reason when it is not.
_CONFIGURED: dict[str, tuple[Callable[[Settings], bool], str]] = {
    "reward-funcs": (
        lambda s: bool(s.reward_funcs),
        "no reward functions configured: set unsloth_reward_funcs = pkg.module:func ...",
    ),
    "length-budget": (
        lambda s: bool(s.dataset),
        "no dataset configured: set unsloth_dataset (and unsloth_tokenizer)",
    ),
    "grpo-config": (
        lambda s: bool(s.grpo_config),
        "no GRPO settings configured: set unsloth_grpo_config (one 'key = value' per line)",
    ),
    "dataset": (
        lambda s: bool(s.dataset),
        "no dataset configured: set unsloth_dataset = path/to/train.jsonl",
    ),
}


class _ChildRuns:
    """The GRPO check children of one session, started together so their imports overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, ThreadCall[ProbeResult]] = {}

    def start(self, name: str, ctx: CheckContext) -> None:
        """Start the child of check ``name`` unless it is started already."""

        def run() -> ProbeResult:
            try:
                return _run_child(name, ctx)
            except Exception as exc:  # a bug here must fail one check, not the session
                from pytest_unsloth.probes.protocol import ProbeResult

                return ProbeResult(f"grpo-{name}", "error", f"{type(exc).__name__}: {exc}")

        with self.lock:
            if name not in self.calls:
                self.calls[name] = ThreadCall(run, name=f"unsloth-grpo-{name}")

    def get(self, name: str, ctx: CheckContext) -> ProbeResult:
        """The child's result, starting it if needed and waiting for it."""
        self.start(name, ctx)
        return self.calls[name].result()


_RUNS: weakref.WeakKeyDictionary[CheckContext, _ChildRuns] = weakref.WeakKeyDictionary()
_RUNS_LOCK = threading.Lock()


def _selected(ctx: CheckContext) -> list[str]:
    """The configured GRPO checks this session runs, to start them together.

    Not under xdist: a worker collects every item but runs only those it is sent.
    """
    config = ctx.config
    if config is None or hasattr(config, "workerinput"):
        return []
    session = config.pluginmanager.get_plugin("session")
    names = set()
    for item in getattr(session, "items", None) or ():
        check = getattr(item, "check", None)
        if item.nodeid.startswith("unsloth-env::") and check is not None and not check.disabled:
            names.add(item.name)
    return [n for n in CHILD_BODIES if n in names and _CONFIGURED[n][0](ctx.settings)]


def _in_child(name: str, ctx: CheckContext) -> str | None:
    """Run the check's body in a child interpreter with the check's time limit (skip when its
    part of the setup is not configured).

    The body runs the user's code; whatever that code does to its process (exit, segfault,
    endless loop, memory blow-up) fails this check with the stage it reached, not the session.
    The first GRPO check to run starts the other selected ones too, so their imports overlap.
    """
    configured, unset = _CONFIGURED[name]
    if not configured(ctx.settings):
        raise CheckSkipped(unset)
    with _RUNS_LOCK:
        runs = _RUNS.get(ctx)
        if runs is None:
            runs = _RUNS[ctx] = _ChildRuns()
            for other in _selected(ctx):
                runs.start(other, ctx)
    res = runs.get(name, ctx)
    return _result(name, ctx, res)


def _run_child(name: str, ctx: CheckContext) -> ProbeResult:
    """Start ``python -m pytest_unsloth.grpo.child NAME`` and wait for its result."""
    from pytest_unsloth.grpo.child import encode_settings
    from pytest_unsloth.probes.runner import child_env, run_subprocess

    env = child_env()
    if ctx.settings.allow_download:  # the user allowed Hub downloads: keep their own settings
        for key in _OFFLINE:
            if key in os.environ:
                env[key] = os.environ[key]
            else:
                env.pop(key, None)
    argv = [
        sys.executable,
        "-m",
        "pytest_unsloth.grpo.child",
        name,
        str(ctx.rootpath),
        encode_settings(ctx.settings),
    ]
    return run_subprocess(argv, f"grpo-{name}", ctx.settings.probe_timeout, env)


def _result(name: str, ctx: CheckContext, res: ProbeResult) -> str | None:
    """Turn the child's result into this check's pass, skip or three-line failure."""
    from pytest_unsloth.checks.isolated import replay

    raised = f"the {name} check raised instead of passing, failing or skipping (in its subprocess)"
    return replay(
        res,
        raised,
        lambda: _child_failure(name, ctx, res.message, res.stage or "", res.stderr_tail),
    )


def _child_failure(
    name: str, ctx: CheckContext, message: str, where: str, tail: str
) -> CheckFailed:
    """Found / why / fix for a child that hung, crashed or exited: name the user code it ran."""
    from pytest_unsloth.probes.runner import stderr_summary

    note = stderr_summary(tail)
    found = f"the {name} check's process {message}" + (f"; stderr: {note}" if note else "")
    limit = f"{ctx.settings.probe_timeout:g} s ({ctx.settings.source('probe_timeout')})"
    if where.startswith(_REWARD_STAGE):
        what = f"reward function {where[len(_REWARD_STAGE) :]}"
        runs = "GRPOTrainer calls every reward function in the training process at every step"
    elif where.startswith("import "):
        what = f"importing {where[len('import ') :]}"
        runs = "the training script imports the reward module the same way"
    else:
        what = f"the step '{where}'" if where else "the check's start-up"
        runs = "the training run does the same step with the same inputs"
    if "timed out" in message:
        return CheckFailed(
            found,
            f"{what} did not finish within the check's limit of {limit}; {runs}, so it would "
            "stall training the same way",
            f"find the endless loop or the blocking call in {what} (a remote judge needs its "
            "own timeout); raise unsloth_probe_timeout only if it is really this slow",
        )
    if "died with" in message:
        memory = "SIGKILL" in message
        return CheckFailed(
            found,
            f"{what} killed the Python process"
            + (" (SIGKILL: usually the kernel's out-of-memory killer)" if memory else "")
            + f"; {runs}, so it would kill the whole GRPO run",
            (
                f"reduce what {what} allocates (score one completion at a time)"
                if memory
                else f"run {what} by hand under `python -X faulthandler` to find the native "
                "frame (a C extension, ctypes, a library built for another torch)"
            ),
        )
    return CheckFailed(
        found,
        f"{what} ended the Python process without returning (os._exit, or a library that "
        f"exits); {runs}, so it would end the GRPO run",
        f"remove the exit from {what}: return a reward (or None) instead",
    )
