"""Hostile GRPO setups: user code that exits, interrupts, crashes, hangs, mutates or returns NaN.

The ``--unsloth-env`` checks run the user's code in a child process, so none of this reaches
pytest; the helpers called from tests run it in-process, on the main thread as TRL does, and
turn SystemExit / KeyboardInterrupt raised by the function into findings. A real Ctrl-C still
stops pytest. Where a finding claims that TRL accepts something, a real GRPOTrainer trains on it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from cpugrpo import cpu_grpo_config
from pytest_unsloth.grpo.budget import check_length_budget
from pytest_unsloth.grpo.rewards import RewardReport, check_reward_funcs

needs_transformers = pytest.mark.skipif(
    find_spec("transformers") is None or find_spec("tokenizers") is None,
    reason="the length budget needs transformers and tokenizers (not the minimal env)",
)


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip unless every module is installed (the pytest-only env has none of the stack)."""
    missing = [m for m in modules if find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed)")


def rows(n: int = 4) -> list[dict[str, Any]]:
    return [
        {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}
        for i in range(n)
    ]


def problems(report: RewardReport, name: str) -> dict[str, Any]:
    """code -> Problem for one function."""
    result = next(r for r in report.results if r.name == name)
    return {p.code: p for p in result.problems}


def score(completions: list[Any], **kwargs: Any) -> list[float]:
    return [float(len(c[0]["content"])) for c in completions]


# --- reward functions that misbehave ------------------------------------------------------------


def exits_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    sys.exit(3)


def interrupts_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    raise KeyboardInterrupt


def looping_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    while True:
        pass


def sleeping_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    time.sleep(60)
    return [0.0 for _ in completions]


def memory_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    buffer = bytearray(1 << 62)  # malloc refuses at once: MemoryError, nothing allocated
    return [float(len(buffer)) for _ in completions]


def signal_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """math_verify's timeout pattern: SIGALRM handler + signal.alarm, main thread only."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError("parse took too long")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    try:
        return [float(len(c[0]["content"]) % 3) for c in completions]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mutating_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    for c in completions:
        c[0]["content"] = c[0]["content"].strip().upper()
    return [1.0 for _ in completions]


def sees_original(completions: list[Any], **kwargs: Any) -> list[float]:
    assert not any(c[0]["content"].isupper() and c[0]["content"].strip() for c in completions)
    return [1.0 for _ in completions]


def math_reward(completions: list[Any], task: list[str], **kwargs: Any) -> list[float | None]:
    """TRL's documented multi-task pattern: None for rows of another task."""
    return [1.0 if t == "math" else None for t in task]


def code_reward(completions: list[Any], task: list[str], **kwargs: Any) -> list[float | None]:
    return [
        float(len(c[0]["content"]) % 2) if t == "code" else None
        for c, t in zip(completions, task, strict=True)
    ]


def multitask_rows(n: int = 8) -> list[dict[str, Any]]:
    # The first rows are all 'math': a checker that looks at 4 rows never sees 'code'.
    return [
        {
            "prompt": [{"role": "user", "content": f"Task {i}: solve it"}],
            "task": "math" if i < n - 2 else "code",
        }
        for i in range(n)
    ]


# --- in-process: SystemExit, KeyboardInterrupt, hangs, memory ---------------------------------


def test_system_exit_in_reward_is_a_finding() -> None:
    report = check_reward_funcs([exits_reward, score], rows())
    p = problems(report, "exits_reward")["raised"]
    assert p.found.startswith("raised SystemExit: 3 at ")
    assert "ends the whole GRPO run" in p.why
    assert "instead of exiting" in p.fix
    assert problems(report, "score") == {}


def test_keyboard_interrupt_raised_by_reward_is_a_finding() -> None:
    report = check_reward_funcs([interrupts_reward], rows())
    p = problems(report, "interrupts_reward")["raised"]
    assert p.found.startswith("raised KeyboardInterrupt")
    assert "no Ctrl-C was pressed" in p.why
    # Our SIGINT handler is gone again: a real Ctrl-C reaches Python's default handler.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("func", [looping_reward, sleeping_reward])
def test_endless_loop_and_sleep_time_out_on_the_main_thread(func: Any) -> None:
    start = time.perf_counter()
    report = check_reward_funcs([func, score], rows(), timeout=0.5)
    assert time.perf_counter() - start < 10
    assert "did not return within 0.5 s" in problems(report, func.__name__)["timeout"].found
    assert problems(report, "score") == {}
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)


def test_memory_error_is_a_finding_with_its_own_advice() -> None:
    p = problems(check_reward_funcs([memory_reward], rows()), "memory_reward")["raised"]
    assert "MemoryError" in p.found
    assert "more memory than the machine has" in p.why


def test_signal_based_reward_passes_as_in_trl() -> None:
    report = check_reward_funcs([signal_reward], rows(), timeout=5)
    assert report.ok, report.format()


def test_foreign_sigalrm_owner_is_left_alone() -> None:
    """pytest-timeout's signal method owns SIGALRM: no limit of ours, its timer untouched."""
    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        report = check_reward_funcs([score], rows(), timeout=0.1)
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert report.ok
        assert 90 < remaining <= 100
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_off_main_thread_the_limit_uses_a_helper_thread() -> None:
    import threading

    box: dict[str, RewardReport] = {}
    worker = threading.Thread(
        target=lambda: box.setdefault(
            "r", check_reward_funcs([sleeping_reward], rows(), timeout=0.3)
        )
    )
    worker.start()
    worker.join(20)
    assert "timeout" in problems(box["r"], "sleeping_reward")


# --- in-process: what the function returns or does to its inputs ------------------------------


def mutate_then_raise(completions: list[Any], **kwargs: Any) -> list[float]:
    completions.clear()
    raise ValueError("gave up")


def test_mutating_reward_is_reported_and_others_see_pristine_inputs() -> None:
    report = check_reward_funcs([mutating_reward, mutate_then_raise, sees_original], rows())
    assert set(problems(report, "mutate_then_raise")) == {"mutates-inputs", "raised"}
    p = problems(report, "mutating_reward")["mutates-inputs"]
    assert p.severity == "warning"
    assert "completions" in p.found
    assert "functions after this one score" in p.why
    assert problems(report, "sees_original") == {}


def _constant(value: Any, kind: str) -> Any:
    def reward(completions: list[Any], **kwargs: Any) -> Any:
        if kind == "numpy":
            import numpy as np

            return [np.float32(value)] + [np.float32(1.0)] * (len(completions) - 1)
        if kind == "torch":
            import torch

            return torch.tensor([value] + [1.0] * (len(completions) - 1))
        return [value] + [1.0] * (len(completions) - 1)

    reward.__name__ = f"{kind}_reward"
    return reward


@pytest.mark.parametrize(
    "kind",
    [
        "float",
        pytest.param("numpy", marks=needs("numpy")),
        pytest.param("torch", marks=needs("torch")),
    ],
)
def test_nan_and_inf_rewards(kind: str) -> None:
    nan = check_reward_funcs([_constant(math.nan, kind)], rows())
    p = problems(nan, f"{kind}_reward")["nan-reward"]
    assert p.severity == "warning" and nan.ok
    assert "cannot tell them apart" in p.why
    inf = check_reward_funcs([_constant(math.inf, kind)], rows())
    p = problems(inf, f"{kind}_reward")["inf-reward"]
    assert p.severity == "error" and not inf.ok
    assert "zero advantage" in p.why and "inf" in p.why


def test_sync_function_returning_a_coroutine_is_not_awaited_as_in_trl() -> None:
    async def inner(completions: list[Any]) -> list[float]:
        return [1.0 for _ in completions]

    def wraps_async(completions: list[Any], **kwargs: Any) -> Any:
        return inner(completions)

    async def real_async(completions: list[Any], **kwargs: Any) -> list[float]:
        return [1.0 for _ in completions]

    report = check_reward_funcs([wraps_async, real_async], rows())
    assert "async def" in problems(report, "wraps_async")["not-a-list"].fix
    assert problems(report, "real_async") == {}


@pytest.mark.parametrize(
    ("body", "exc", "why", "fix"),
    [
        (
            "kwargs['solution']",
            "KeyError",
            "reads 'solution', which TRL does not pass",
            "kwargs.get",
        ),
        ("completions[0]['content']", "TypeError", "FLAT lists", "completions[i][0]['content']"),
        ("max(key=1)", "TypeError", "by keyword", "accept (prompts, completions, **kwargs)"),
        (
            "__import__('no_such_scorer_xyz')",
            "ModuleNotFoundError",
            "imports no_such_scorer_xyz",
            "install no_such_scorer_xyz",
        ),
        (
            "__import__('numpy').ones(3) + __import__('numpy').ones(4)",
            "ValueError",
            "shape mismatch",
            "one score per completion",
        ),
        ("1 / 0", "ZeroDivisionError", "does not catch exceptions", "guard the input"),
    ],
)
def test_raised_advice_fits_the_exception(body: str, exc: str, why: str, fix: str) -> None:
    if "numpy" in body and find_spec("numpy") is None:
        pytest.skip("needs numpy")
    namespace: dict[str, Any] = {}
    exec(  # a real function with a real traceback line
        f"def broken(prompts, completions, **kwargs):\n    return {body}\n", namespace
    )
    p = problems(check_reward_funcs([namespace["broken"]], rows()), "broken")["raised"]
    assert f"raised {exc}" in p.found
    assert why in p.why, p.why
    assert fix in p.fix, p.fix


# --- None judged across functions, as TRL does --------------------------------------------------


def test_multitask_none_is_judged_per_row_and_every_task_is_seen() -> None:
    report = check_reward_funcs([math_reward, code_reward], multitask_rows(), num_prompts=4)
    assert report.ok, report.format()
    assert problems(report, "math_reward") == {} and problems(report, "code_reward") == {}
    assert not report.problems


def test_rows_no_function_scores_are_a_warning_and_a_set_that_never_scores_an_error() -> None:
    some = check_reward_funcs([math_reward], multitask_rows())
    assert some.ok
    assert [p.code for p in some.problems] == ["unscored-rows"]
    assert "got None from every reward function" in some.problems[0].found
    never = check_reward_funcs([code_reward], multitask_rows(8)[:5])
    assert not never.ok
    assert problems(never, "code_reward")["all-none"].severity == "error"


# --- length budget: never raises ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("transformers")
    from pytest_unsloth.models import tiny

    return tiny.load_tokenizer(tiny.build("llama", cache_dir=tmp_path_factory.mktemp("tiny")))


@pytest.mark.slow
def test_image_parts_under_a_text_only_template_are_measured_as_text(tiny_tokenizer: Any) -> None:
    vision = [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}],
                }
            ]
        },
        {"prompt": [{"role": "user", "content": "plain question"}]},
    ]
    report = check_length_budget(
        tiny_tokenizer, vision, max_seq_length=256, max_completion_length=8
    )
    assert report.count == 2 and report.max > 0
    (p,) = [p for p in report.problems if p.code == "media-parts"]
    assert "image tokens NOT counted" in p.found and "TypeError" in p.found


@pytest.mark.slow
def test_other_template_errors_are_findings(tiny_tokenizer: Any) -> None:
    bad = [{"prompt": [{"role": "user", "content": 5}]}]
    report = check_length_budget(tiny_tokenizer, bad, max_seq_length=256, max_completion_length=8)
    (p,) = report.problems
    assert p.code == "template-error" and "row 0" in p.found
    broken = check_length_budget(
        tiny_tokenizer, rows(), max_seq_length=256, config={"max_completion_length": "lots"}
    )
    assert [q.code for q in broken.problems] == ["measure-failed"]


# --- a real Ctrl-C still stops pytest -----------------------------------------------------------


def _interrupt_pytest(folder: Path, args: list[str], marker: Path) -> tuple[int, str, float]:
    """Start pytest, wait until the reward function runs, send SIGINT to pytest alone."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *args],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the reward function never started"
            time.sleep(0.1)
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out, time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()


REWARDS_WAITING = """
import os, time

def waiting_reward(completions, **kwargs):
    with open({marker!r}, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(50)
    return [0.0 for _ in completions]
"""


@pytest.mark.slow
def test_real_ctrl_c_stops_a_test_calling_check_reward_funcs(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    (tmp_path / "rewards_mod.py").write_text(REWARDS_WAITING.format(marker=str(marker)))
    (tmp_path / "test_it.py").write_text(
        textwrap.dedent(
            """
            from pytest_unsloth import check_reward_funcs
            from rewards_mod import waiting_reward

            def test_rewards():
                report = check_reward_funcs([waiting_reward], timeout=None)
                print("REPORT", report)
            """
        )
    )
    rc, out, took = _interrupt_pytest(tmp_path, ["-q", "-s", "test_it.py"], marker)
    assert rc == 2, out
    assert "KeyboardInterrupt" in out
    assert "REPORT" not in out  # not swallowed into a finding
    assert took < 30


@pytest.mark.slow
def test_real_ctrl_c_stops_unsloth_env_and_the_check_child_goes_too(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    (tmp_path / "rewards_mod.py").write_text(REWARDS_WAITING.format(marker=str(marker)))
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nunsloth_reward_funcs = rewards_mod:waiting_reward\nunsloth_probe_timeout = 120\n"
    )
    rc, out, took = _interrupt_pytest(tmp_path, ["--unsloth-env", "-k", "reward"], marker)
    assert rc == 2, out
    assert "KeyboardInterrupt" in out
    assert took < 30
    child = int(marker.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:  # pragma: no cover - the failure branch
        os.kill(child, signal.SIGKILL)
        pytest.fail("the check's child outlived pytest")


# --- --unsloth-env: the user's code runs in a child that may die -------------------------------

SELECT = ["--unsloth-env", "-p", "no:cacheprovider", "-k", "reward"]

HOSTILE_MODULE = """
import ctypes, os, signal, sys


def fine(completions, **kwargs):
    return [1.0 for _ in completions]


def hard_exit(completions, **kwargs):
    os._exit(0)


def segfault(completions, **kwargs):
    return [float(len(ctypes.string_at(0)))]


def deaf_loop(completions, **kwargs):
    # Takes SIGALRM over (ignored), so only the parent's kill at the check's timeout ends it.
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        pass


def raises_interrupt(completions, **kwargs):
    raise KeyboardInterrupt("from the reward code")
"""


def run_env(pytester: pytest.Pytester, funcs: str, *extra_ini: str) -> pytest.RunResult:
    pytester.makepyfile(hostile=HOSTILE_MODULE)
    pytester.makeini(
        "[pytest]\nunsloth_reward_funcs = "
        + funcs
        + "\n"
        + "".join(f"{line}\n" for line in extra_ini)
    )
    return pytester.runpytest_subprocess(*SELECT, "-rA", timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("func", "found", "why"),
    [
        (
            "hard_exit",
            "exited with code 0 in stage 'call reward function hard_exit'",
            "ended the Python process without returning",
        ),
        (
            "segfault",
            "died with SIGSEGV in stage 'call reward function segfault'",
            "killed the Python process",
        ),
    ],
)
def test_crashing_reward_fails_its_check_not_the_session(
    pytester: pytest.Pytester, func: str, found: str, why: str
) -> None:
    result = run_env(pytester, f"hostile:fine hostile:{func}")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    assert found in out, out
    assert f"reward function {func} {why}" in out, out


@pytest.mark.slow
def test_reward_deaf_to_sigalrm_is_killed_at_the_checks_timeout(pytester: pytest.Pytester) -> None:
    start = time.monotonic()
    result = run_env(pytester, "hostile:deaf_loop", "unsloth_probe_timeout = 12")
    result.assert_outcomes(failed=1)
    assert time.monotonic() - start < 90
    result.stdout.fnmatch_lines(
        [
            "*timed out after 12 s in stage 'call reward function deaf_loop'*",
            "*reward function deaf_loop did not finish within the check's limit of 12 s*",
        ]
    )


@pytest.mark.slow
def test_system_exit_at_import_and_keyboard_interrupt_are_findings(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(exits_on_import="import sys\nsys.exit('configure me first')\n")
    result = run_env(pytester, "exits_on_import:reward hostile:raises_interrupt hostile:fine")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines_random(
        [
            "*cannot import 'exits_on_import' for 'exits_on_import:reward' (*): "
            "SystemExit: configure me first*",
            "*hostile:raises_interrupt: raised KeyboardInterrupt: from the reward code*",
            "*move the code that exits under `if __name__ == '__main__':`*",
        ]
    )


@pytest.mark.slow
def test_missing_function_lists_only_functions_defined_in_the_module(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        helpers="import re\nfrom os.path import join\n\n\n"
        "def format_reward_func(completions, **kw):\n"
        "    return [0.0 for _ in completions]\n\n\ndef _private(): pass\n"
    )
    pytester.makeini("[pytest]\nunsloth_reward_funcs = helpers:format_reward\n")
    result = pytester.runpytest(*SELECT)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["fix:   check the spelling; helpers defines: format_reward_func"])


@pytest.mark.slow
@needs_transformers
def test_missing_tokenizer_folder_says_missing(pytester: pytest.Pytester) -> None:
    (pytester.path / "train.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    for value, found in (
        (
            "models/tok",
            "*= 'models/tok': no such folder (*models/tok), and no Hub model of that id in the "
            "local Hugging Face cache*",
        ),
        ("./models/tok", "*= './models/tok': no such folder (*)"),
    ):
        pytester.makeini(f"[pytest]\nunsloth_dataset = train.jsonl\nunsloth_tokenizer = {value}\n")
        result = pytester.runpytest("--unsloth-env", "-p", "no:cacheprovider", "-k", "budget")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([found])
        assert "huggingface.co" not in result.stdout.str()


# --- what TRL really accepts: it trains ---------------------------------------------------------


@pytest.mark.slow
@needs("torch", "transformers", "tokenizers", "trl", "datasets")
def test_trl_trains_with_multitask_none_and_signal_based_rewards(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer  # type: ignore[attr-defined]

    from pytest_unsloth.models import tiny

    funcs = [math_reward, code_reward, signal_reward]
    data = multitask_rows(8)
    assert check_reward_funcs(funcs, data).ok
    folder = tiny.build("llama", seed=0, cache_dir=tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    args = cpu_grpo_config(str(tmp_path / "out"), max_steps=2)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,  # type: ignore[arg-type]
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tiny.load_tokenizer(folder),
    )
    with caplog.at_level(logging.WARNING):
        out = trainer.train()
    assert out.global_step == 2
    assert "All reward functions returned None" not in caplog.text


MULTITASK_MODULE = """
import signal


def math_reward(completions, task, **kwargs):
    return [1.0 if t == "math" else None for t in task]


def code_reward(completions, task, **kwargs):
    return [0.5 if t == "code" else None for t in task]


def signal_reward(completions, **kwargs):
    def on_alarm(signum, frame):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    try:
        return [float(len(c[0]["content"]) % 3) for c in completions]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
"""


@pytest.mark.slow
def test_unsloth_env_accepts_multitask_none_and_signal_based_rewards(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(multitask=MULTITASK_MODULE)
    (pytester.path / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in multitask_rows(12)), encoding="utf-8"
    )
    pytester.makeini(
        "[pytest]\nunsloth_dataset = train.jsonl\nunsloth_reward_funcs = multitask:math_reward "
        "multitask:code_reward multitask:signal_reward\n"
    )
    result = pytester.runpytest(*SELECT, "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*3 reward function(s) pass on 10 conversational completions*"])
    assert "warning" not in result.stdout.str()
