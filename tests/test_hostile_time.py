"""Time limits that really bound time: a child whose detached descendant (double fork + setsid,
out of the probe's process group) keeps stdout/stderr open must not stretch a probe or an
isolated check past its timeout, nor delay a result the child already printed.

Every grandchild here is real; it writes its pid to a file and the fixture kills it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from distfake import write_dist
from pytest_unsloth.probes.protocol import ProbeResult
from pytest_unsloth.probes.runner import PIPE_GRACE_S, run_subprocess
from subrun import run_pytest

SRC = str(Path(__file__).parents[1] / "src")
H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "total_gib": 79.6, "free_gib": 79.0}

# Code that leaves a grandchild in its own session, holding the inherited stdout/stderr for 60 s.
DETACH = """
import os as _os, time as _time
def detach(pidfile, close_stdout=False):
    if _os.fork() == 0:
        _os.setsid()
        if _os.fork() == 0:
            if close_stdout:
                _os.close(1)
            with open(pidfile, "w") as fh:
                fh.write(str(_os.getpid()))
            _time.sleep(60)
            _os._exit(0)
        _os._exit(0)
    _os.wait()
    for _ in range(200):  # the pid file tells the test whom to clean up
        if _pid_written(pidfile):
            break
        _time.sleep(0.01)
def _pid_written(pidfile):
    if not _os.path.exists(pidfile):
        return False
    with open(pidfile) as fh:  # closed: PYTHONDEVMODE prints a ResourceWarning to stderr
        return bool(fh.read())
"""


@pytest.fixture
def pidfiles(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Pid-file factory; every grandchild that wrote one is killed at teardown."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path / f"{name}.pid")
        return made[-1]

    yield make
    for path in made:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(path.read_text()), signal.SIGKILL)


def _alive(pidfile: Path) -> int:
    pid = int(pidfile.read_text())
    os.kill(pid, 0)  # raises if the grandchild is gone: then the scenario proved nothing
    return pid


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    header = f"import sys, time\nsys.path.insert(0, {SRC!r})\n"
    header += "from pytest_unsloth.probes import emit, stage, run\n" + DETACH
    script.write_text(header + textwrap.dedent(body))
    return [sys.executable, str(script)]


def _timed(argv: list[str], timeout: float) -> tuple[float, ProbeResult]:
    start = time.monotonic()
    res = run_subprocess(argv, "x", timeout)
    return time.monotonic() - start, res


def test_hanging_child_with_detached_grandchild_ends_at_its_timeout(tmp_path: Path, pidfiles):
    pid = pidfiles("gc")
    argv = _child(
        tmp_path,
        f"""
        def body():
            stage("detach")
            detach({str(pid)!r})
            stage("wait forever")
            time.sleep(60)
        run("x", {{"x": body}})
        """,
    )
    took, res = _timed(argv, 2)
    holder = _alive(pid)
    assert took < 2 + PIPE_GRACE_S + 3
    assert res.status == "failed"
    assert res.message == (
        f"timed out after 2 s in stage 'wait forever'; a detached process (pid {holder}) kept "
        f"its stdout/stderr open, so output was read for {PIPE_GRACE_S:g} s more and then left"
    )


def test_child_that_passes_is_taken_at_once_despite_a_detached_grandchild(tmp_path: Path, pidfiles):
    pid = pidfiles("gc")
    argv = _child(
        tmp_path,
        f"""
        def body():
            stage("detach")
            detach({str(pid)!r})
            return emit("passed", "kernel ok", answer=42)
        run("x", {{"x": body}})
        """,
    )
    took, res = _timed(argv, 30)
    _alive(pid)
    assert took < PIPE_GRACE_S + 5  # not 60 s, the grandchild's lifetime
    assert (res.status, res.message, res.data["answer"]) == ("passed", "kernel ok", 42)


def test_exit_without_result_names_the_detached_holder(tmp_path: Path, pidfiles):
    pid = pidfiles("gc")
    argv = _child(
        tmp_path,
        f"""
        stage("detach")
        detach({str(pid)!r})
        print("boom", file=sys.stderr)
        sys.exit(3)
        """,
    )
    took, res = _timed(argv, 30)
    holder = _alive(pid)
    assert took < PIPE_GRACE_S + 5
    assert res.message.startswith(
        f"exited with code 3 in stage 'detach' without a result; a detached process (pid {holder})"
    )
    assert res.stderr_tail == "boom"


def test_signal_death_with_a_detached_grandchild(tmp_path: Path, pidfiles):
    pid = pidfiles("gc")
    argv = _child(
        tmp_path,
        f"""
        import os, signal
        stage("detach")
        detach({str(pid)!r})
        stage("crash")
        os.kill(os.getpid(), signal.SIGSEGV)
        """,
    )
    took, res = _timed(argv, 30)
    holder = _alive(pid)
    assert took < PIPE_GRACE_S + 5
    assert res.message.startswith(
        f"died with SIGSEGV in stage 'crash'; a detached process (pid {holder})"
    )


def test_grandchild_holding_only_stderr_is_found_too(tmp_path: Path, pidfiles):
    pid = pidfiles("gc")
    argv = _child(
        tmp_path,
        f"""
        def body():
            detach({str(pid)!r}, close_stdout=True)
            stage("wait forever")
            time.sleep(60)
        run("x", {{"x": body}})
        """,
    )
    took, res = _timed(argv, 2)
    holder = _alive(pid)
    assert took < 2 + PIPE_GRACE_S + 3
    assert f"a detached process (pid {holder}) kept" in res.message


def test_large_output_is_read_whole_and_no_note_without_a_holder(tmp_path: Path):
    argv = _child(
        tmp_path,
        """
        sys.stdout.write("x" * 3_000_000 + "\\n")
        sys.stderr.write("e" * 500_000 + "\\n")
        run("x", {"x": lambda: emit("passed", "big")})
        """,
    )
    took, res = _timed(argv, 60)
    assert (res.status, res.message, took < 30) == ("passed", "big", True)


def test_plain_timeout_has_no_detached_note(tmp_path: Path):
    argv = _child(tmp_path, 'stage("sleep")\ntime.sleep(60)\n')
    took, res = _timed(argv, 1.5)
    assert took < 1.5 + 3
    assert res.message == "timed out after 1.5 s in stage 'sleep'"


# ----------------------------------------------------------------------------------------------
# Whole sessions: a kernel probe and an isolated custom check, each leaving a detached grandchild.


def _session(pytester: pytest.Pytester, *args: str, budget: float = 40) -> pytest.RunResult:
    start = time.monotonic()
    result, _ = run_pytest(pytester, *args, timeout=budget)
    took = time.monotonic() - start
    assert took < budget
    return result


@pytest.mark.slow
@pytest.mark.parametrize("hang", [True, False], ids=["hangs", "returns"])
def test_kernel_probe_with_detached_grandchild(
    pytester: pytest.Pytester, fake_nvml, monkeypatch: pytest.MonkeyPatch, pidfiles, hang: bool
):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    pid = pidfiles("vllm-gc")
    site = pytester.path / "site"
    code = DETACH + f"detach({str(pid)!r})\n" + ("_time.sleep(60)\n" if hang else "")
    write_dist(site, "vllm", "0.11.0", module="vllm", code=code + "__version__ = '0.11.0'\n")
    (site / "vllm" / "_C.py").write_text("")
    write_dist(site, "torch", "2.11.0+cu130", module="torch", code="__version__ = '2.11'\n")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ['PYTHONPATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = _session(
        pytester,
        "--unsloth-env",
        "--unsloth-checks=vllm",
        "--unsloth-probe-timeout=4",
        "-p",
        "no:cacheprovider",
    )
    holder = _alive(pid)
    if hang:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "found: * timed out after 4 s in stage 'import vllm'; a detached process "
                f"(pid {holder}) kept its stdout/stderr open*"
            ]
        )
    else:
        result.assert_outcomes(passed=1)


ISOLATED = (
    """
import time
import pytest_unsloth
"""
    + DETACH
    + """
@pytest_unsloth.check("detach-hang", isolated=True, timeout=3)
def detach_hang():
    detach({hang_pid!r})
    time.sleep(60)

@pytest_unsloth.check("detach-pass", isolated=True, timeout=30)
def detach_pass():
    detach({pass_pid!r})
    return "done"
"""
)


@pytest.mark.slow
def test_isolated_checks_with_detached_grandchildren(pytester: pytest.Pytester, pidfiles):
    hang_pid, pass_pid = pidfiles("hang"), pidfiles("pass")
    pytester.makeconftest(ISOLATED.format(hang_pid=str(hang_pid), pass_pid=str(pass_pid)))
    result = _session(
        pytester, "--unsloth-env", "--unsloth-checks=detach-hang,detach-pass", "-rA", budget=30
    )
    holder = _alive(hang_pid)
    _alive(pass_pid)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "found: isolated check timed out after 3 s in stage 'run the check'; a detached "
            f"process (pid {holder}) kept its stdout/stderr open, so output was read for 1 s "
            "more and then left",
        ]
    )
    assert "PASSED unsloth-env::detach-pass" in result.stdout.str()


def test_leftover_child_in_the_same_group_is_ended_not_reported_as_detached(
    tmp_path: Path, pidfiles
):
    pid = pidfiles("same-group")
    argv = _child(
        tmp_path,
        f"""
        import subprocess
        def body():
            code = "import os, time; open({str(pid)!r}, 'w').write(str(os.getpid()))"
            code += "; time.sleep(60)"
            subprocess.Popen([sys.executable, "-c", code])
            while not open({str(pid)!r}, "a+").tell():
                time.sleep(0.01)
            return emit("passed", "left a helper running")
        run("x", {{"x": body}})
        """,
    )
    took, res = _timed(argv, 30)
    assert took < PIPE_GRACE_S + 5
    assert (res.status, res.message) == ("passed", "left a helper running")
    time.sleep(0.2)
    # It was in the probe's group: ended with it (gone, or a zombie awaiting init's reaping).
    stat = Path(f"/proc/{pid.read_text()}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
