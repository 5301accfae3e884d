"""Reward-function contract: call each function the way the installed TRL's GRPOTrainer does.

TRL calls every reward function by keyword with flat lists (one entry per completion, dataset
columns repeated once per generation) and turns the result into a float tensor. This module reads
the call from the installed ``trl/trainer/grpo_trainer.py`` (without importing TRL), calls each
function with synthetic or dataset-shaped inputs, and reports every way the call would fail at
the first training step, or train nothing.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import inspect
import math
import os
import pathlib
import signal
import sys
import sysconfig
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from pytest_unsloth.findings import Finding
from pytest_unsloth.grpo.problems import errors, installed_version, shorten
from pytest_unsloth.util.readable import ReadableRepr

__all__ = [
    "FuncResult",
    "RewardContract",
    "RewardReport",
    "RewardTimeout",
    "assert_reward_funcs",
    "check_reward_funcs",
    "reward_contract",
]

Shape = Literal["conversational", "plain"]
# The words pytest and the probes use; "model" marks a reward model, which is not called here.
Status = Literal["passed", "failed", "model"]
# How a status reads in FuncResult.format() (the text the report has always printed).
_STATUS_TEXT: dict[Status, str] = {"passed": "pass", "failed": "fail", "model": "model"}

# What TRL 1.15/1.16 do, used only when the installed grpo_trainer.py cannot be read.
_ASSUMED_EXPLICIT = ("prompts", "completions", "completion_ids")
_ASSUMED_EXTRA = ("trainer_state", "log_extra", "log_metric")
_ASSUMED_CONDITIONAL = ("environments",)
_ASSUMED_EXCLUDED = ("prompt", "completion", "completion_ids")
_ASSUMED_FROM = "1.16.0"

_FLAT_SHAPE = (
    "TRL calls reward functions by keyword with FLAT lists: completions has one entry per "
    "completion (prompts x num_generations = {n} here), each [{{'role': 'assistant', 'content': "
    "str}}] for conversational data or a str for plain data; prompts and every dataset column "
    "are repeated once per generation, so completions[i] is one completion, not a group"
)

_SYNTHETIC_TEXTS = (
    "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>\n",
    "<think>2 plus 2 is 4</think> <answer>4</answer>",
    "The answer is 4.",
    "",
    "<reasoning>\nnot sure\n</reasoning>\n<answer>\nfive\n</answer>",
    "答案是 4",
    "<answer>4</answer> and some trailing text that goes on for a while",
    "I cannot answer that.",
)
_SYNTHETIC_QUESTIONS = (
    "What is 2 + 2?",
    "Natalia sold clips to 48 of her friends. How many clips did she sell?",
    "Name a colour of the sky.",
    "Write one word.",
)
_SYSTEM_PROMPT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


@dataclasses.dataclass(frozen=True)
class RewardContract:
    """How the installed TRL calls reward functions (read from its source, or assumed)."""

    explicit: tuple[str, ...]
    extra: tuple[str, ...]
    conditional: tuple[str, ...]
    excluded_columns: tuple[str, ...]
    trl_version: str | None
    source: str

    def keywords(self, columns: Iterable[str]) -> list[str]:
        """Return every keyword TRL passes for a dataset with ``columns``."""
        names = list(self.explicit) + list(self.extra)
        names += [c for c in columns if c not in self.excluded_columns and c not in names]
        return names


@dataclasses.dataclass(frozen=True, repr=False)
class FuncResult(ReadableRepr):
    """What happened to one entry of ``reward_funcs``."""

    index: int
    name: str
    status: Status
    shapes: tuple[Shape, ...]
    problems: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """Whether nothing here makes training fail or train nothing."""
        return not errors(self.problems)

    def format(self) -> str:
        """Render this function's status and every finding as found / why / fix."""
        lines = [f"{self.name}: {'ok' if self.ok else 'FAILED'} ({_STATUS_TEXT[self.status]})"]
        for p in self.problems:
            lines += [f"  [{p.severity}] {p.code}", p.format("    ")]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


@dataclasses.dataclass(frozen=True, repr=False)
class RewardReport(ReadableRepr):
    """The result of :func:`check_reward_funcs`: one :class:`FuncResult` per reward function."""

    results: tuple[FuncResult, ...]
    problems: tuple[Finding, ...]
    contract: RewardContract
    shape: Shape | None
    num_completions: int

    @property
    def ok(self) -> bool:
        """Whether every function passed and the inputs themselves had no error."""
        return not errors(self.problems) and all(r.ok for r in self.results)

    def failures(self) -> list[tuple[str, Finding]]:
        """Return (function name, problem) for every error, report-level ones named ``*``."""
        out = [("*", p) for p in errors(self.problems)]
        for r in self.results:
            out += [(r.name, p) for p in errors(r.problems)]
        return out

    def format(self) -> str:
        """Render the report: one line per function, then found/why/fix for each finding."""
        where = "dataset rows" if self.shape else "synthetic inputs"
        lines = [
            f"reward functions checked against {self.num_completions} completions of {where} "
            f"(call contract {self.contract.source})"
        ]
        for p in self.problems:
            lines += [f"  [{p.severity}] inputs", p.format("    ")]
        for r in self.results:
            mark = {"passed": "ok", "failed": "FAILED", "model": "reward model"}[r.status]
            shapes = f" ({', '.join(r.shapes)})" if r.shapes else ""
            lines.append(f"  {r.name}: {mark}{shapes}")
            for p in r.problems:
                lines += [f"    [{p.severity}] {p.code}", p.format("      ")]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# ---------------------------------------------------------------------------------------------
# Reading the installed TRL


def _grpo_trainer_source() -> pathlib.Path | None:
    """Locate trl/trainer/grpo_trainer.py without importing trl."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / "trainer" / "grpo_trainer.py"
        if path.is_file():
            return path
    return None


def _parse_contract(source: str) -> tuple[tuple[str, ...], ...]:
    """Extract the reward call's keywords from GRPOTrainer._calculate_rewards' source."""
    tree = ast.parse(source)
    fn = next(
        (
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name == "_calculate_rewards"
        ),
        None,
    )
    if fn is None:
        raise LookupError("no GRPOTrainer._calculate_rewards")
    extra, conditional = _reward_kwargs_keys(fn)
    explicit = _explicit_keywords(fn)
    if not explicit or not extra:
        raise LookupError("no reward_func(...) call with **reward_kwargs found")
    return tuple(explicit), tuple(extra), tuple(conditional), tuple(_excluded_columns(fn))


def _reward_kwargs_keys(fn: ast.FunctionDef) -> tuple[list[str], list[str]]:
    """Keys assigned as ``reward_kwargs["key"] = ...``: always, and only under an ``if``."""
    extra: list[str] = []
    conditional: list[str] = []
    for stmt in fn.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Subscript)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "reward_kwargs"
                        and isinstance(target.slice, ast.Constant)
                        and isinstance(target.slice.value, str)
                    ):
                        # Keys set under an `if` (environments) are passed only in some setups.
                        (extra if node is stmt else conditional).append(target.slice.value)
    return extra, conditional


def _explicit_keywords(fn: ast.FunctionDef) -> list[str]:
    """The keywords of the ``reward_func(..., **reward_kwargs)`` call."""
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("reward_func", "func")
            and any(k.arg is None for k in node.keywords)
        ):
            return [k.arg for k in node.keywords if k.arg is not None]
    return []


def _excluded_columns(fn: ast.FunctionDef) -> list[str]:
    """The dataset columns TRL leaves out of the reward keywords (``key not in [...]``)."""
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], ast.NotIn)
            and isinstance(node.comparators[0], ast.List | ast.Tuple | ast.Set)
        ):
            elts = node.comparators[0].elts
            return [
                e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
            ]
    return []


def _assumed_contract(version: str | None, why: str) -> RewardContract:
    """The contract of the TRL version the plugin was written against, when TRL's is unread."""
    return RewardContract(
        _ASSUMED_EXPLICIT,
        _ASSUMED_EXTRA,
        _ASSUMED_CONDITIONAL,
        _ASSUMED_EXCLUDED,
        version,
        f"assumed from TRL {_ASSUMED_FROM}{why}",
    )


@functools.lru_cache(maxsize=4)
def _contract_for(path: str | None, mtime: float) -> RewardContract:
    """Parse (once per file version) the installed TRL's reward call."""
    version = installed_version("trl")
    if path is None:
        return _assumed_contract(version, " (TRL's grpo_trainer.py not found)")
    try:
        explicit, extra, conditional, excluded = _parse_contract(
            pathlib.Path(path).read_text(encoding="utf-8")
        )
    except (OSError, SyntaxError, LookupError, ValueError) as exc:
        return _assumed_contract(
            version,
            f"; could not read the installed TRL {version} ({type(exc).__name__}: {exc})",
        )
    return RewardContract(
        explicit,
        extra,
        conditional,
        excluded or _ASSUMED_EXCLUDED,
        version,
        f"read from the installed TRL {version} GRPOTrainer._calculate_rewards",
    )


def reward_contract() -> RewardContract:
    """Return how the installed TRL calls reward functions."""
    path = _grpo_trainer_source()
    mtime = path.stat().st_mtime if path is not None else 0.0
    return _contract_for(str(path) if path is not None else None, mtime)


# ---------------------------------------------------------------------------------------------
# Inputs


def _callable_name(func: Any) -> str:
    """Name a reward function as TRL's get_callable_name does."""
    while isinstance(func, functools.partial):
        func = func.func
    return str(getattr(func, "__name__", type(func).__name__))


def _is_conversational(value: object) -> bool:
    """TRL's is_conversational for one prompt: a list whose first item is a dict with a role."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and ("role" in value[0])
    )


def _rows(dataset: Any, count: int) -> list[dict[str, Any]]:
    """Take the first ``count`` rows of a datasets.Dataset, a list of dicts or a dict of lists."""
    if isinstance(dataset, Mapping):
        columns = list(dataset)
        length = min((len(dataset[c]) for c in columns), default=0)
        return [{c: dataset[c][i] for c in columns} for i in range(min(count, length))]
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        n = min(count, len(dataset))
        return [dict(row) for row in dataset.select(range(n))]
    rows: list[dict[str, Any]] = []
    for row in dataset:
        if len(rows) >= count:
            break
        if not isinstance(row, Mapping):
            raise TypeError(f"dataset rows must be mappings, got {type(row).__name__}")
        rows.append(dict(row))
    return rows


class _TrainerStateStandIn:
    """The attributes reward functions read from transformers' TrainerState at step 0."""

    def __init__(self) -> None:
        self.epoch: float = 0.0
        self.global_step = 0
        self.max_steps = 0
        self.num_train_epochs = 0
        self.log_history: list[dict[str, float]] = []
        self.is_local_process_zero = True
        self.is_world_process_zero = True


def _trainer_state() -> Any:
    """Use transformers' TrainerState when it is already imported (importing it costs seconds)."""
    module = sys.modules.get("transformers.trainer_callback")
    if module is not None:
        return module.TrainerState()
    return _TrainerStateStandIn()


@dataclasses.dataclass
class _Batch:
    shape: Shape
    prompts: list[Any]
    completions: list[Any]
    completion_ids: list[list[int]]
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.completions)

    def item(self, i: int) -> _Batch:
        return _Batch(
            self.shape,
            self.prompts[i : i + 1],
            self.completions[i : i + 1],
            self.completion_ids[i : i + 1],
            {k: v[i : i + 1] for k, v in self.columns.items()},
        )


def _make_batch(
    shape: Shape, rows: list[dict[str, Any]] | None, num_prompts: int, num_generations: int
) -> _Batch:
    """Build one generation batch: each prompt repeated num_generations times, as TRL does."""
    prompts: list[Any] = []
    completions: list[Any] = []
    columns: dict[str, list[Any]] = {}
    if rows is None:
        rows = []
        for i in range(num_prompts):
            question = _SYNTHETIC_QUESTIONS[i % len(_SYNTHETIC_QUESTIONS)]
            prompt: Any = (
                [
                    {"role": "system", "content": _SYSTEM_PROMPT},
                    {"role": "user", "content": question},
                ]
                if shape == "conversational"
                else question + "\n"
            )
            rows.append({"prompt": prompt})
    k = 0
    for row in rows:
        for _ in range(num_generations):
            prompts.append(row.get("prompt"))
            text = _SYNTHETIC_TEXTS[k % len(_SYNTHETIC_TEXTS)]
            k += 1
            completions.append(
                [{"role": "assistant", "content": text}] if shape == "conversational" else text
            )
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
    ids = [[(ord(c) % 250) + 3 for c in str(c_)[:32]] or [2] for c_ in completions]
    return _Batch(shape, prompts, completions, ids, columns)


# ---------------------------------------------------------------------------------------------
# Calling


class _Recorder:
    """Stand-in for TRL's log_extra / log_metric callbacks."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))


_SKIP_DIRS = tuple(
    os.path.normcase(os.path.realpath(p))
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")}
)


def _user_frame(exc: BaseException) -> str:
    """Return 'file:line in func: code' for the deepest traceback frame in the user's code."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if os.path.normcase(os.path.realpath(f.filename))
        != os.path.normcase(os.path.realpath(__file__))
    ]
    if not frames:
        return "(no traceback)"
    user = [
        f
        for f in frames
        if not os.path.normcase(os.path.realpath(f.filename)).startswith(_SKIP_DIRS)
    ]
    frame = (user or frames)[-1]
    code = f": {frame.line.strip()}" if frame.line else ""
    return f"{frame.filename}:{frame.lineno} in {frame.name}{code}"


class RewardTimeout(Exception):
    """A reward function did not return within the check's timeout."""


class _AlarmTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException, so ``except Exception`` in the user's
    function cannot swallow it."""


class UserExit(Exception):
    """A reward function raised SystemExit or KeyboardInterrupt itself (not a real Ctrl-C)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__}: {original}".rstrip(": "))
        self.original = original
        self.__traceback__ = original.__traceback__


# Set by the --unsloth-env child process to announce each call as a stage, so a crash or a hang
# that ends the child is reported with the function it happened in.
stage_hook: Callable[[str], None] | None = None


def _is_async(func: Any) -> bool:
    """TRL's is_async_callable: an async function, a partial of one, or an async ``__call__``."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - TRL inspects __call__ the same way
    )


def _in_thread(target: Callable[[], Any], timeout: float | None, name: str) -> Any:
    """Run ``target`` in a daemon thread (abandoned, not waited for, when it overruns)."""
    from pytest_unsloth.util.timelimit import TimeLimitExceeded, call_in_thread

    try:
        return call_in_thread(target, timeout, name)
    except TimeLimitExceeded as exc:
        raise RewardTimeout(str(exc)) from None
    except (SystemExit, KeyboardInterrupt) as exc:
        # Off the main thread these can only come from the function: a real Ctrl-C goes to the
        # main thread.
        raise UserExit(exc) from None


def _can_use_alarm() -> bool:
    """Whether SIGALRM is free for us: main thread, no handler installed, no timer pending."""
    if not hasattr(signal, "setitimer"):  # pragma: no cover - Windows
        return False
    # pytest-timeout's signal method, or the user's own alarm, owns SIGALRM then: leave it be.
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return False
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@contextlib.contextmanager
def _main_thread_call(timeout: float | None) -> Iterator[None]:
    """Bound a main-thread call with SIGALRM where that is safe, and tell a real Ctrl-C (the
    SIGINT handler ran) from a KeyboardInterrupt the function raised itself.

    Not ``util.timelimit``: TRL calls sync reward functions on the main thread, and code that
    sets its own ``signal.alarm`` (math_verify) works only there, so the check must call them
    there too; the limit is then a timer signal, not a thread that could be abandoned.
    """
    use_alarm = timeout is not None and _can_use_alarm()
    old_alarm: Any = None
    if use_alarm:

        def on_alarm(signum: int, frame: Any) -> None:
            raise _AlarmTimeout

        old_alarm = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout or 0.0)
    real_sigint: list[bool] = []
    old_int: Any = signal.getsignal(signal.SIGINT)
    watch_int = old_int is signal.default_int_handler
    if watch_int:

        def on_int(signum: int, frame: Any) -> None:
            real_sigint.append(True)
            signal.default_int_handler(signum, frame)

        signal.signal(signal.SIGINT, on_int)
    try:
        yield
    except _AlarmTimeout:
        raise RewardTimeout(f"did not return within {timeout:g} s") from None
    except KeyboardInterrupt as exc:
        # A real Ctrl-C must stop pytest; so must one we cannot tell apart (a custom handler).
        if real_sigint or (not watch_int and callable(old_int)):
            raise
        raise UserExit(exc) from None
    except SystemExit as exc:
        raise UserExit(exc) from None
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_alarm)
        if watch_int:
            signal.signal(signal.SIGINT, old_int)


def _call(func: Any, kwargs: dict[str, Any], timeout: float | None) -> Any:
    """Call as TRL does, with a time limit where one can be enforced.

    TRL calls sync functions on the main thread (``signal.alarm``-based code such as
    math_verify needs that) and awaits async ones on an event loop in a daemon thread. On the
    main thread the limit is a SIGALRM timer, used only when no SIGALRM handler or timer is
    already installed (pytest-timeout's, the user's): otherwise the call has no limit. Off the
    main thread the call runs in a helper thread that is abandoned at the limit.
    """
    if stage_hook is not None:
        stage_hook(f"call reward function {_callable_name(func)}")
    if _is_async(func):
        return _in_thread(lambda: asyncio.run(func(**kwargs)), timeout, "reward-check-async")
    if threading.current_thread() is threading.main_thread():
        try:
            with _main_thread_call(timeout):
                return func(**kwargs)
        except _AlarmTimeout:  # the timer fired just as the function returned
            raise RewardTimeout(f"did not return within {timeout:g} s") from None
    return _in_thread(lambda: func(**kwargs), timeout, "reward-check")


def _kwargs_for(
    batch: _Batch, contract: RewardContract, accepted: set[str] | None
) -> dict[str, Any]:
    """Build TRL's keyword arguments for one batch, keeping only ``accepted`` names if given."""
    kwargs: dict[str, Any] = {
        "prompts": batch.prompts,
        "completions": batch.completions,
        "completion_ids": batch.completion_ids,
        "trainer_state": _trainer_state(),
        "log_extra": _Recorder(),
        "log_metric": _Recorder(),
    }
    # Keep exactly the names the installed TRL passes, in case TRL renamed or added one.
    kwargs = {k: kwargs.get(k) for k in (*contract.explicit, *contract.extra)}
    for key, values in batch.columns.items():
        if key not in contract.excluded_columns:
            kwargs.setdefault(key, values)
    if accepted is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return kwargs


def _to_rewards(output: Any, n: int) -> tuple[list[Finding], list[float] | None]:
    """Apply TRL's post-processing to one function's output.

    Returns the problems and, when TRL would accept the output, the rewards as floats with NaN
    where the function returned None (as TRL stores them).
    """
    problem = _not_a_list(output, n)
    if problem is not None:
        return [problem], None
    raw = list(output)
    values = [math.nan if v is None else v for v in raw]
    problem = _wrong_length(values, n) if len(values) != n else _not_numbers(values, n)
    if problem is not None:
        return [problem], None
    floats = _as_floats(values)
    return _not_finite(raw, floats, n), floats


def _not_a_list(output: Any, n: int) -> Finding | None:
    """Error when TRL cannot iterate the output into rewards (an awaitable, a str, a dict...)."""
    if inspect.isawaitable(output):
        close = getattr(output, "close", None)
        if callable(close):
            close()  # never awaited: silence "coroutine was never awaited"
        return Finding(
            found=f"returned an awaitable ({type(output).__name__}) from a function that is "
            "not async",
            why="TRL awaits only functions it recognises as async (async def, or an async "
            "__call__); this one's result is iterated as it is, so the first step raises "
            f"TypeError: '{type(output).__name__}' object is not iterable",
            fix="declare the reward function itself with async def",
            code="not-a-list",
        )
    if isinstance(output, str | bytes | Mapping) or not isinstance(output, Iterable):
        kind = type(output).__name__
        return Finding(
            found=f"returned {kind} {shorten(output)}, not a list of {n} rewards",
            why="TRL iterates the result to turn None into NaN; "
            + (
                f"a {kind} is not iterable, so the first step raises TypeError: '{kind}' "
                "object is not iterable"
                if not isinstance(output, Iterable)
                else f"iterating a {kind} yields its {'keys' if kind == 'dict' else 'items'}, "
                "which are not rewards"
            ),
            fix="return a list with one float (or None) per completion, e.g. [score(c) for c "
            f"in completions] (len {n})",
            code="not-a-list",
        )
    return None


def _wrong_length(values: list[Any], n: int) -> Finding:
    """Error: not one reward per completion."""
    nested = bool(values) and all(isinstance(v, list | tuple) for v in values)
    return Finding(
        found=f"returned {len(values)} rewards for {n} completions"
        + (" (a list of lists: one list per group?)" if nested else ""),
        why=f'TRL raises ValueError "The reward function returned {len(values)} rewards, '
        f'but {n} were expected" at the first step; ' + _FLAT_SHAPE.format(n=n),
        fix="return exactly one reward per completion: [score(c) for c in completions]",
        code="wrong-length",
    )


def _not_numbers(values: list[Any], n: int) -> Finding | None:
    """Error when TRL's float32 tensor cannot hold the rewards."""
    bad = _non_numeric(values)
    if not bad:
        return None
    i, v = bad[0]
    nested = any(isinstance(x, list | tuple) for _, x in bad)
    return Finding(
        found=f"{len(bad)} of {n} rewards are not numbers, first: rewards[{i}] = "
        f"{shorten(v)} ({type(v).__name__})",
        why="TRL builds torch.tensor(rewards, dtype=float32), which fails on "
        + ("nested lists; " + _FLAT_SHAPE.format(n=n) if nested else "this value"),
        fix="return one float (or None when not applicable) per completion",
        code="non-numeric",
    )


def _not_finite(raw: list[Any], floats: list[float], n: int) -> list[Finding]:
    """An error for infinite rewards, a warning for NaN returned where None was meant."""
    problems: list[Finding] = []
    nans = [i for i, (r, f) in enumerate(zip(raw, floats, strict=True)) if r is not None and f != f]
    infs = [i for i, f in enumerate(floats) if math.isinf(f)]
    if infs:
        i = infs[0]
        problems.append(
            Finding(
                found=f"returned {len(infs)} infinite reward(s) of {n}, first: rewards[{i}] = "
                f"{shorten(raw[i])}",
                why="TRL sums the rewards and subtracts the group mean: inf - inf is NaN, which it "
                "then turns into a zero advantage (nan_to_num), so the whole group of completions "
                "trains nothing, and the logged reward mean becomes inf",
                fix="clip the reward to a finite range (e.g. min(max(r, -10.0), 10.0)); return "
                "None for a completion the function cannot score",
                code="inf-reward",
            )
        )
    if nans:
        i = nans[0]
        problems.append(
            Finding(
                found=f"returned NaN (not None) for {len(nans)} of {n} completions, first: "
                f"rewards[{i}] = {shorten(raw[i])}",
                why="TRL stores None as NaN and cannot tell them apart: these completions count as "
                "'not applicable' for this function, so a NaN from a failed computation (0/0, an "
                "empty mean) silently drops the score instead of failing",
                fix="return None on purpose for rows the function does not apply to, and a number "
                "(e.g. 0.0) when scoring fails",
                code="nan-reward",
                severity="warning",
            )
        )
    return problems


def _as_floats(values: list[Any]) -> list[float]:
    """The rewards as TRL's float32 tensor holds them (NaN for None)."""
    try:
        import torch
    except ImportError:
        return [float(v) for v in values]
    return [float(x) for x in torch.tensor(values, dtype=torch.float32).tolist()]


def _non_numeric(values: list[Any]) -> list[tuple[int, Any]]:
    """Return the entries torch.tensor(..., dtype=float32) would reject, as TRL uses it."""
    try:
        import torch
    except ImportError:  # judge by Python types; TRL itself needs torch anyway
        import numbers

        return [(i, v) for i, v in enumerate(values) if not isinstance(v, numbers.Real)]
    try:
        buffer = torch.zeros(len(values), 1)
        # The exact TRL operation: a float32 tensor assigned into one column of the reward table.
        buffer[:, 0] = torch.tensor(values, dtype=torch.float32)
        return []
    except (TypeError, ValueError, RuntimeError):
        pass
    bad = []
    for i, v in enumerate(values):
        try:
            t = torch.tensor(v, dtype=torch.float32)
            if t.dim() != 0 and t.numel() != 1:
                bad.append((i, v))
        except (TypeError, ValueError, RuntimeError):
            bad.append((i, v))
    return bad or [(0, values[0])]


def _signature_problems(
    func: Any,
    name: str,
    contract: RewardContract,
    columns: list[str] | None,
) -> tuple[list[Finding], set[str] | None, list[str]]:
    """Compare parameters with TRL's keywords: problems, accepted names, missing columns."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return [], None, []
    params = list(sig.parameters.values())
    passed = contract.keywords(columns or [])
    problems: list[Finding] = []
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        problems.append(
            Finding(
                found=f"parameters {', '.join(positional_only)} are positional-only",
                why="TRL passes everything by keyword",
                fix="remove the '/' from the signature",
                code="positional-only",
            )
        )
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted: set[str] | None = None
    unexpected = [k for k in passed if k not in names]
    if unexpected and not any(p.kind is p.VAR_KEYWORD for p in params):
        problems.append(_missing_kwargs(name, sig, contract, unexpected))
        accepted = names
    required = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is p.empty
        and p.name not in passed
    ]
    if required:
        problems.append(_needs_columns(name, required, columns))
    return problems, accepted, required


def _missing_kwargs(
    name: str, sig: inspect.Signature, contract: RewardContract, unexpected: list[str]
) -> Finding:
    """Error: TRL passes keywords the signature does not take."""
    return Finding(
        found=f"{name}{sig} has no **kwargs, but TRL {contract.trl_version or ''} also "
        f"passes {', '.join(unexpected)}".replace("TRL  ", "TRL "),
        why=f"the first step raises TypeError: {name}() got an unexpected keyword "
        f"argument '{unexpected[0]}'",
        fix=f"add **kwargs to the signature: def {name}(prompts, completions, ..., **kwargs)",
        code="missing-kwargs",
    )


def _needs_columns(name: str, required: list[str], columns: list[str] | None) -> Finding:
    """Required parameters TRL fills from columns: an error against real columns, else info."""
    if columns is not None:
        have = ", ".join(c for c in columns) or "none"
        return Finding(
            found=f"parameter{'s' if len(required) > 1 else ''} {', '.join(required)} "
            f"{'have' if len(required) > 1 else 'has'} no default and the dataset has no such "
            f"column (columns: {have})",
            why="TRL fills reward parameters from dataset columns by name; the first step "
            f"raises TypeError: {name}() missing required keyword argument '{required[0]}'",
            fix=f"add the column '{required[0]}' to the dataset (dataset.map) or give the "
            "parameter a default",
            code="missing-column",
        )
    return Finding(
        found=f"needs dataset column{'s' if len(required) > 1 else ''} "
        f"{', '.join(required)} (checked with placeholder strings)",
        why="TRL fills reward parameters from dataset columns by name",
        fix=f"make sure the training dataset has {', '.join(repr(r) for r in required)}",
        code="needs-column",
        severity="info",
    )


# Single completions tried to find the one that makes a function raise.
_CULPRIT_SEARCH = 16


def _raised_problem(
    func: Any,
    name: str,
    exc: BaseException,
    batch: _Batch,
    contract: RewardContract,
    accepted: set[str] | None,
    timeout: float | None,
) -> Finding:
    """Describe an exception, naming the first single completion that reproduces it."""
    culprit = ""
    if len(batch) > 1:
        for i in range(min(len(batch), _CULPRIT_SEARCH)):
            try:
                _call(func, _kwargs_for(copy.deepcopy(batch.item(i)), contract, accepted), timeout)
            except RewardTimeout:
                break
            except Exception:
                culprit = f" on completion #{i} = {shorten(batch.completions[i], 70)}"
                break
    original = exc.original if isinstance(exc, UserExit) else exc
    why, fix = _advice(original, name, batch, contract)
    return Finding(
        found=f"raised {type(original).__name__}: {_clip(str(original), 120)} at "
        f"{_user_frame(exc)} ({batch.shape} input{culprit})",
        why=why,
        fix=fix,
        code="raised",
    )


_NOT_CAUGHT = (
    "TRL does not catch exceptions from reward functions: the first step that hits it stops"
)
_FLAT_FIX = (
    "index one completion at a time: completions[i][0]['content'] (conversational) or "
    "completions[i] (plain); return one float per completion; guard empty completions"
)


def _advice(
    exc: BaseException, name: str, batch: _Batch, contract: RewardContract
) -> tuple[str, str]:
    """Why and fix lines that fit the exception the function raised."""
    return (
        _exit_advice(exc)
        or _data_advice(exc, batch, contract)
        or _call_advice(exc, name, len(batch))
        or (
            _NOT_CAUGHT + "; model outputs can be empty, unformatted or arbitrary text",
            "guard the input that triggers it (shown above) and return 0.0 (or None) when a "
            "completion cannot be scored",
        )
    )


def _exit_advice(exc: BaseException) -> tuple[str, str] | None:
    """For SystemExit and a KeyboardInterrupt the function raised: both stop the run."""
    if isinstance(exc, SystemExit):
        return (
            "a reward function runs inside the training process: sys.exit() there (SystemExit, "
            f"code {exc.code!r}) ends the whole GRPO run at the first step",
            "return a reward (0.0, or None for 'not applicable') instead of exiting; raise an "
            "exception only for a real bug",
        )
    if isinstance(exc, KeyboardInterrupt):
        return (
            "the function raised KeyboardInterrupt itself (no Ctrl-C was pressed); in training "
            "that stops the run at the first step exactly like a Ctrl-C",
            "remove the raise KeyboardInterrupt (or the call that raises it) from the reward code",
        )
    return None


def _data_advice(
    exc: BaseException, batch: _Batch, contract: RewardContract
) -> tuple[str, str] | None:
    """For lookups that expect another data shape or a keyword TRL does not pass."""
    text = str(exc)
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        key = exc.args[0]
        if key in ("content", "role"):
            return (
                f"completions[i] is [{{'role': 'assistant', 'content': str}}] for "
                f"conversational data and a str for plain data ({batch.shape} here); the key "
                f"{key!r} is looked up on something else",
                _FLAT_FIX,
            )
        columns = [c for c in batch.columns if c not in contract.excluded_columns]
        return (
            f"the function reads {key!r}, which TRL does not pass: keyword arguments are "
            f"{', '.join(contract.keywords(columns))} (every dataset column by name)",
            f"add a {key!r} column to the dataset (dataset.map), or read it with "
            f"kwargs.get({key!r}) and return None for rows without it",
        )
    flat = (
        isinstance(exc, KeyError | IndexError)
        or (isinstance(exc, TypeError) and ("indices" in text or "subscriptable" in text))
        or (isinstance(exc, AttributeError) and ("'str' object" in text or "'list' object" in text))
    )
    if flat:
        return (
            _FLAT_SHAPE.format(n=len(batch)) + "; indexing errors like this one usually mean the "
            "code treats completions[i] as a group of num_generations completions, or expects "
            "the other data shape",
            _FLAT_FIX,
        )
    return None


def _call_advice(exc: BaseException, name: str, n: int) -> tuple[str, str] | None:
    """For a bad call, a failing import, a shape mismatch or running out of memory."""
    text = str(exc)
    if isinstance(exc, TypeError) and any(w in text for w in ("argument", "keyword", "positional")):
        return (
            f"TRL calls {name}(prompts=..., completions=..., completion_ids=..., **columns, "
            "trainer_state=..., log_extra=..., log_metric=...) by keyword, and the call inside "
            "the function does not match what it is given",
            "accept (prompts, completions, **kwargs), read dataset columns by name, and check "
            "the arguments of the call named above",
        )
    if isinstance(exc, ImportError):
        missing = getattr(exc, "name", None) or text
        return (
            f"the function imports {missing} when it is called, and that import fails here; "
            "it fails the same way at the first training step",
            f"install {missing} in the training environment, or import it at module level so "
            "the import check reports it",
        )
    if isinstance(exc, ValueError | RuntimeError) and any(
        w in text.lower() for w in ("shape", "size", "dimension", "broadcast")
    ):
        return (
            f"a shape mismatch: prompts, completions and every column are flat lists of {n} "
            "(one entry per completion); arrays or tensors built from them have that length",
            "build exactly one score per completion, and compare arrays of the same length",
        )
    if isinstance(exc, MemoryError):
        return (
            "the function asked for more memory than the machine has; in training it shares "
            "the machine with the model",
            "score one completion at a time without large buffers",
        )
    return None


def _clip(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SHARED_INPUTS = ("trainer_state", "log_extra", "log_metric")
_RAISED = object()  # marks a call that raised


def _fingerprint(kwargs: dict[str, Any]) -> dict[str, str] | None:
    """repr() of each input the function could change in place (None when one cannot be)."""
    try:
        return {k: repr(v) for k, v in kwargs.items() if k not in _SHARED_INPUTS}
    except Exception:
        return None


def _restore(batch: _Batch, pristine: _Batch) -> None:
    """Undo in-place changes, in place, so every holder of these lists sees the originals."""
    batch.prompts[:] = copy.deepcopy(pristine.prompts)
    batch.completions[:] = copy.deepcopy(pristine.completions)
    batch.completion_ids[:] = copy.deepcopy(pristine.completion_ids)
    for key, values in pristine.columns.items():
        if key in batch.columns:
            batch.columns[key][:] = copy.deepcopy(values)


def _check_one(
    index: int,
    func: Any,
    batches: list[_Batch],
    contract: RewardContract,
    columns: list[str] | None,
    timeout: float | None,
    pristine: list[_Batch] | None = None,
) -> tuple[FuncResult, dict[Shape, list[float]]]:
    """Check one reward function against each batch shape; also return its rewards per shape."""
    name = _callable_name(func) if callable(func) else shorten(func)
    not_called = _not_called(index, func, name)
    if not_called is not None:
        return not_called, {}
    sig_problems, accepted, required = _signature_problems(func, name, contract, columns)
    calls = _call_on_batches(func, name, batches, contract, accepted, required, timeout, pristine)
    problems = list(sig_problems) + calls.mutated
    shapes = _add_shape_problems(problems, calls.per_shape, several=len(batches) > 1)
    status: Status = "failed" if errors(problems) else "passed"
    usable = {s: v for s, v in calls.rewards.items() if s in shapes}
    return FuncResult(index, name, status, shapes, tuple(problems)), usable


def _not_called(index: int, func: Any, name: str) -> FuncResult | None:
    """The result for an entry that is not a function to call: a path, a model, anything else."""
    if isinstance(func, str | os.PathLike):
        return _check_string(index, os.fspath(func))
    if _is_module(func):
        return FuncResult(index, name, "model", (), ())
    if not callable(func):
        problem = Finding(
            found=f"reward_funcs[{index}] is {type(func).__name__} {shorten(func)}",
            why="TRL accepts functions, callable objects, reward models or model ids",
            fix="pass the reward function object",
            code="not-callable",
        )
        return FuncResult(index, name, "failed", (), (problem,))
    return None


class _Calls(NamedTuple):
    """What calling one function on each batch gave."""

    per_shape: dict[Shape, list[Finding]]  # the problems of each shape called
    rewards: dict[Shape, list[float]]  # the rewards of each shape TRL would accept
    mutated: list[Finding]  # one warning when the function changed its inputs


def _call_on_batches(
    func: Any,
    name: str,
    batches: list[_Batch],
    contract: RewardContract,
    accepted: set[str] | None,
    required: list[str],
    timeout: float | None,
    pristine: list[_Batch] | None,
) -> _Calls:
    """Call the function on each batch as TRL would; stop at the first timeout."""
    calls = _Calls({}, {}, [])
    for b, batch in enumerate(batches):
        for r in required:
            batch.columns.setdefault(r, [f"placeholder {r}"] * len(batch))
        kwargs = _kwargs_for(batch, contract, accepted)
        before = _fingerprint(kwargs)
        try:
            output = _call(func, kwargs, timeout)
        except RewardTimeout as exc:
            calls.per_shape[batch.shape] = [_timed_out(exc, batch)]
            break  # the function may still be running; do not start it again
        except Exception as exc:  # UserExit (SystemExit, KeyboardInterrupt raised by it) too
            calls.per_shape[batch.shape] = [
                _raised_problem(func, name, exc, batch, contract, accepted, timeout)
            ]
            output = _RAISED
        after = _fingerprint(kwargs) if before is not None else None
        changed = [k for k, v in (before or {}).items() if after is not None and after.get(k) != v]
        if changed and pristine is not None:
            # The next function (or shape) must see what TRL would have generated.
            _restore(batch, pristine[b])
        if changed and not calls.mutated:
            calls.mutated.append(_mutates_inputs(changed))
        if output is _RAISED:
            continue
        problems, values = _to_rewards(output, len(batch))
        calls.per_shape[batch.shape] = problems
        if values is not None:
            calls.rewards[batch.shape] = values
    return calls


def _timed_out(exc: RewardTimeout, batch: _Batch) -> Finding:
    """Error: the function overran the time limit."""
    return Finding(
        found=f"{exc} on {len(batch)} {batch.shape} completions",
        why="GRPOTrainer calls every reward function at every step; one this slow (a "
        "remote judge, a loop that never ends) stalls training",
        fix="make it return in well under a second per batch (batch or cache remote "
        "calls), or raise the timeout if it is really this slow",
        code="timeout",
    )


def _mutates_inputs(changed: list[str]) -> Finding:
    """Warning: the function changed lists TRL passes to the next functions too."""
    return Finding(
        found=f"changes its input{'s' if len(changed) > 1 else ''} {', '.join(changed)} in place",
        why="TRL passes the same prompts, completions and column lists to every reward "
        "function in turn and logs the completions afterwards: the functions after "
        "this one score (and the logs show) the changed data",
        fix="work on copies: text = completion[0]['content'].strip() instead of "
        "assigning into completions, prompts or a column list",
        code="mutates-inputs",
        severity="warning",
    )


def _add_shape_problems(
    problems: list[Finding], per_shape: dict[Shape, list[Finding]], *, several: bool
) -> tuple[Shape, ...]:
    """Add each shape's problems once to ``problems``; return the shapes without errors.

    A function that raises on one of several shapes only is meant for the other shape (many
    index ``completion[0]["content"]``): that becomes an info, not an error.
    """
    shapes = tuple(s for s, ps in per_shape.items() if not errors(ps))
    raised_only = {s for s, ps in per_shape.items() if ps and all(p.code == "raised" for p in ps)}
    if several and shapes and raised_only:
        for s in raised_only:
            p = per_shape[s][0]
            problems.append(
                dataclasses.replace(
                    p,
                    code="shape-only",
                    found=f"supports {' and '.join(shapes)} data only: {p.found}",
                    fix=f"fine if the training data is {' and '.join(shapes)}; otherwise " + p.fix,
                    severity="info",
                )
            )
        for s in shapes:
            problems += [p for p in per_shape[s] if p not in problems]
        return shapes
    seen: set[tuple[str, str]] = set()
    for ps in per_shape.values():
        for p in ps:
            key = (p.code, p.found.split(" (", 1)[0])
            if key not in seen:
                seen.add(key)
                problems.append(p)
    return shapes


def _is_module(obj: object) -> bool:
    """Whether ``obj`` is a torch module (a reward model), without importing torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _check_string(index: int, value: str) -> FuncResult:
    """A string is a reward-model id for TRL; accept only an existing local model folder."""
    path = pathlib.Path(value).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return FuncResult(index, value, "model", (), ())
    why = (
        "TRL loads every string in reward_funcs with AutoModelForSequenceClassification."
        "from_pretrained(..., num_labels=1) as a Hugging Face Hub model id or local folder"
    )
    if path.is_dir():
        problem = Finding(
            found=f"reward_funcs[{index}] = {value!r} is a folder without config.json",
            why=why + ", and this folder is not a saved model",
            fix="point at a folder written by save_pretrained, or pass a reward function object",
            code="string-func",
        )
    elif "/" in value and not value.startswith((".", "/", "~")) and value.count("/") == 1:
        problem = Finding(
            found=f"reward_funcs[{index}] = {value!r} is not a local folder: TRL will treat it as "
            "a Hub model id",
            why=why + "; it is downloaded when the trainer is built, which fails offline (after a "
            "long Hub timeout unless HF_HUB_OFFLINE=1)",
            fix="download the reward model first and pass its local folder, or pass a function",
            code="string-func",
            severity="warning",
        )
    else:
        problem = Finding(
            found=f"reward_funcs[{index}] = {value!r} is a string, not a function, and no such "
            "folder exists",
            why=why
            + f"; {value!r} is treated as a Hub model id, so GRPOTrainer(...) fails with an "
            "OSError (after a ~50 s Hub timeout when offline)",
            fix=f"pass the function object without quotes: reward_funcs=[{value}]"
            if value.isidentifier()
            else "pass the reward function object, or an existing reward-model folder",
            code="string-func",
        )
    return FuncResult(
        index, value, "failed" if problem.severity == "error" else "passed", (), (problem,)
    )


# Rows read from a dataset to choose the checked ones from, and the most rows checked.
_WINDOW = 256
_MAX_ROWS = 16
_MAX_CATEGORIES = 16


def _select_rows(rows: list[dict[str, Any]], count: int) -> tuple[list[dict[str, Any]], str]:
    """Pick ``count`` rows, plus one row for each value of every categorical column (a 'task'
    column of a multi-task dataset), so each function meets the rows it applies to."""
    if len(rows) <= count:
        return rows, ""
    categorical: list[str] = []
    for column in dict.fromkeys(k for row in rows for k in row):
        if column in ("prompt", "completion"):
            continue
        values = [row.get(column) for row in rows]
        if not all(isinstance(v, str | int | bool) or v is None for v in values):
            continue
        distinct = set(values)
        if 1 < len(distinct) <= _MAX_CATEGORIES and len(distinct) < len(values) / 2:
            categorical.append(column)
    chosen = set(range(count))
    for column in categorical:
        seen = {rows[i].get(column) for i in chosen}
        for i, row in enumerate(rows):
            if len(chosen) >= _MAX_ROWS:
                break
            if row.get(column) not in seen:
                seen.add(row.get(column))
                chosen.add(i)
    note = (
        f"rows covering every value of {', '.join(categorical)} in the first {len(rows)}"
        if categorical
        else ""
    )
    return [rows[i] for i in sorted(chosen)], note


_NONE_WHY = (
    "TRL stores None as NaN and skips it when summing the functions' rewards; a completion "
    "that every function gives None is unscorable: TRL logs 'All reward functions returned "
    "None' and gives it zero advantage, so it trains nothing"
)


class _NoneTally(NamedTuple):
    """Which completions some function scored, across the functions that returned rewards."""

    scored_any: bool  # at least one completion got a number from some function
    unscored: list[tuple[_Batch, int]]  # (batch, row) of completions no function scored
    shown: dict[int, int]  # function index -> completions it returned rewards for


def _tally_none(
    scoring: list[int], rewards: list[dict[Shape, list[float]]], batches: list[_Batch]
) -> _NoneTally:
    """Count, per completion, whether any of the ``scoring`` functions gave it a number."""
    scored_any = False
    unscored: list[tuple[_Batch, int]] = []
    shown: dict[int, int] = {}
    for batch in batches:
        funcs = [i for i in scoring if batch.shape in rewards[i]]
        if not funcs:
            continue
        for row in range(len(batch)):
            if any(not math.isnan(rewards[i][batch.shape][row]) for i in funcs):
                scored_any = True
            else:
                unscored.append((batch, row))
        for i in funcs:
            shown[i] = shown.get(i, 0) + len(batch)
    return _NoneTally(scored_any, unscored, shown)


def _none_problems(
    results: list[FuncResult],
    rewards: list[dict[Shape, list[float]]],
    batches: list[_Batch],
) -> tuple[list[Finding], dict[int, Finding]]:
    """Judge None (NaN) across all functions per completion, as TRL does.

    Returns report-level problems and, per function index, an 'all-none' finding.
    """
    scoring = [i for i, r in enumerate(results) if r.status != "failed" or rewards[i]]
    models = [i for i in scoring if results[i].status == "model"]
    if not scoring or models:
        return [], {}  # nothing to judge, or a reward model scores every row
    tally = _tally_none(scoring, rewards, batches)
    never = [
        i for i in tally.shown if all(math.isnan(v) for s, vs in rewards[i].items() for v in vs)
    ]
    per_func = {i: _all_none(tally.shown[i], others_scored=tally.scored_any) for i in never}
    if not tally.scored_any or not tally.unscored:
        return [], per_func
    batch, row = tally.unscored[0]
    total = sum(len(b) for b in batches if any(b.shape in r for r in rewards))
    unscored = Finding(
        found=f"{len(tally.unscored)} of {total} completions got None from every reward "
        f"function, first: completion #{row} of prompt {shorten(batch.prompts[row], 70)}",
        why=_NONE_WHY,
        fix="make sure at least one reward function scores every kind of row (a general "
        "format reward, or the task's own function)",
        code="unscored-rows",
        severity="warning",
    )
    return [unscored], per_func


def _all_none(shown: int, *, others_scored: bool) -> Finding:
    """A function that returned None for everything: a warning if others scored the rows."""
    if not others_scored:
        return Finding(
            found=f"returned None (or NaN) for all {shown} completions, and no other "
            "function scored them either",
            why=_NONE_WHY + "; when no completion is ever scored, no step trains anything",
            fix="return a number for the completions this function applies to (check the "
            "columns it reads)",
            code="all-none",
        )
    return Finding(
        found=f"returned None (or NaN) for all {shown} completions it was shown; other "
        "functions scored them",
        why="TRL treats None as 'not applicable' (multi-task reward functions do this on "
        "purpose), so this is fine only if the function applies to rows not in this sample",
        fix="check the column it reads decides applicability as intended; include rows it "
        "applies to in the dataset",
        code="all-none",
        severity="warning",
    )


class _Sample(NamedTuple):
    """The dataset rows the functions are called on, with their columns and prompt shape."""

    rows: list[dict[str, Any]] | None  # None: no dataset (or no rows), synthetic inputs
    columns: list[str] | None
    shape: Shape | None


def _sample_dataset(dataset: Any, num_prompts: int, problems: list[Finding]) -> _Sample:
    """Read a few rows of ``dataset`` (None: synthetic inputs); report a missing prompt."""
    if dataset is None:
        return _Sample(None, None, None)
    rows, _ = _select_rows(_rows(dataset, max(num_prompts, _WINDOW)), num_prompts)
    if not rows:
        problems.append(
            Finding(
                found="the dataset has no rows",
                why="GRPOTrainer has nothing to sample",
                fix="pass a dataset with at least one row",
                code="empty-dataset",
            )
        )
        return _Sample(None, None, None)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if "prompt" not in columns:
        problems.append(
            Finding(
                found=f"the dataset has no 'prompt' column (columns: {', '.join(columns)})",
                why="GRPOTrainer reads each example's 'prompt' to generate completions",
                fix="map the rows to {'prompt': [...messages...] or str, <other columns>}",
                code="no-prompt",
            )
        )
    shape: Shape = "conversational" if _is_conversational(rows[0].get("prompt")) else "plain"
    return _Sample(rows, columns, shape)


def check_reward_funcs(
    funcs: Sequence[Any] | Callable[..., Any] | str,
    dataset: Any = None,
    num_generations: int = 2,
    *,
    num_prompts: int = 4,
    timeout: float | None = 30.0,
) -> RewardReport:
    """Call each reward function the way the installed TRL's GRPOTrainer does; report problems.

    Sync functions run on the calling thread, as TRL runs them on the main thread; ``timeout``
    is enforced there with SIGALRM only when nothing else uses SIGALRM (pytest-timeout's signal
    method, the user's own alarm), otherwise the call is not time-limited. A SystemExit or
    KeyboardInterrupt raised by a function is a finding; a real Ctrl-C still stops pytest.
    """
    if num_generations < 1 or num_prompts < 1:
        raise ValueError(
            f"num_generations ({num_generations}) and num_prompts ({num_prompts}) must be >= 1"
        )
    items = [funcs] if callable(funcs) or isinstance(funcs, str) else list(funcs)
    contract = reward_contract()
    report_problems: list[Finding] = []
    sample = _sample_dataset(dataset, num_prompts, report_problems)
    if sample.rows is not None and sample.shape is not None:
        rows = sample.rows
        batches = [_make_batch(sample.shape, rows, len(rows), num_generations)]
    else:
        batches = [
            _make_batch("conversational", None, num_prompts, num_generations),
            _make_batch("plain", None, num_prompts, num_generations),
        ]
    pristine = [copy.deepcopy(b) for b in batches]
    checked = [
        _check_one(
            i,
            f,
            [dataclasses.replace(b, columns=dict(b.columns)) for b in batches],
            contract,
            sample.columns,
            timeout,
            pristine,
        )
        for i, f in enumerate(items)
    ]
    results = [r for r, _ in checked]
    more, per_func = _none_problems(results, [v for _, v in checked], batches)
    report_problems += more
    for i, problem in per_func.items():
        r = results[i]
        problems = (*r.problems, problem)
        status: Status = "failed" if errors(problems) else r.status
        results[i] = dataclasses.replace(r, problems=problems, status=status)
    return RewardReport(
        tuple(results), tuple(report_problems), contract, sample.shape, len(batches[0])
    )


def assert_reward_funcs(
    funcs: Sequence[Any] | Callable[..., Any] | str,
    dataset: Any = None,
    num_generations: int = 2,
    *,
    num_prompts: int = 4,
    timeout: float | None = 30.0,
) -> RewardReport:
    """Like :func:`check_reward_funcs`, but raise AssertionError with the report on failure."""
    report = check_reward_funcs(
        funcs, dataset, num_generations, num_prompts=num_prompts, timeout=timeout
    )
    if not report.ok:
        raise AssertionError("reward functions would fail in GRPOTrainer:\n" + report.format())
    return report
