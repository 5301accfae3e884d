"""The parent side of the probes: each in its own ``python -m pytest_unsloth.probes NAME`` child
with a timeout, and the session's ``ProbeStore``.

The pytest process never imports torch or touches CUDA. Probes run concurrently, at most once
per session, and once per xdist run (workers share results through a locked run directory).
A probe that hangs is killed (its whole process group) and reported with the stage it reached;
one that dies by a signal is reported with the signal's name and the tail of its stderr.
``run_subprocess`` starts the child (``_spawn``), reads it to the end (``_collect``) and turns
what happened into a result (``report``, reading stdout with ``protocol.parse``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_unsloth.probes.protocol import MARK, Output, ProbeResult, parse
from pytest_unsloth.probes.table import PROBE_DISTS, PROBE_MIN_GPUS, PROBE_NAMES
from pytest_unsloth.util.files import file_lock, read_json, write_json_atomic

if TYPE_CHECKING:
    from pytest_unsloth.gpu import NvmlSnapshot
    from pytest_unsloth.probes.cache import ProbeCache
    from pytest_unsloth.settings import Settings

STDERR_TAIL = 1500
# Variables a probe child gets so it never blocks on the Hub and reports crashes readably.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONFAULTHANDLER": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "UNSLOTH_DISABLE_STATISTICS": "1",
}


@dataclasses.dataclass(frozen=True)
class Pin:
    """Run a probe with this ``CUDA_VISIBLE_DEVICES`` (None: unset) instead of the process's own."""

    cuda_visible_devices: str | None

    def key(self, name: str) -> str:
        """The name results are stored under (run directory, cache): one per probe and pin."""
        value = "unset" if self.cuda_visible_devices is None else self.cuda_visible_devices
        safe = "".join(c if c.isalnum() or c in "-_.," else "_" for c in value)
        return f"{name}@{safe or 'none'}"

    def environ(self) -> dict[str, str]:
        """The child's environment with this pin applied."""
        env = child_env()
        if self.cuda_visible_devices is None:
            env.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        return env


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child: the parent's, its import path, offline Hub, faulthandler."""
    env = dict(os.environ if base is None else base)
    env.update(CHILD_ENV)
    # The child must see the packages this pytest process sees (plugins may extend sys.path).
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= STDERR_TAIL else "…" + text[-STDERR_TAIL:]


def stderr_summary(tail: str) -> str:
    """The informative line of a child's stderr: faulthandler's verdict and innermost frame for
    a crash, else the last non-empty line (usually the exception)."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    if not lines:
        return ""
    fatal = next((ln for ln in lines if ln.startswith("Fatal Python error:")), None)
    if fatal is not None:
        # faulthandler lists the most recent call first, under "Current thread ...".
        start = next(
            (i for i, ln in enumerate(lines) if ln.startswith(("Current thread", "Thread 0x"))),
            None,
        )
        frame = (
            next((ln for ln in lines[start + 1 :] if ln.startswith("File ")), None)
            if start is not None
            else None
        )
        return f"{fatal}; at {frame}" if frame else fatal
    return lines[-1][:300]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows
            proc.kill()
    except (ProcessLookupError, PermissionError):
        proc.kill()


# After the child has exited (or been killed), how long its pipes may stay open. A descendant
# that left the process group (double fork + setsid) can hold them for ever; past this grace
# period the parent stops reading and keeps what it has.
PIPE_GRACE_S = 1.0


def pipe_holders(inodes: Iterable[int]) -> list[int]:
    """Pids of other processes holding a pipe with one of these inodes (Linux /proc; else [])."""
    wanted = {f"pipe:[{i}]" for i in inodes}
    me = os.getpid()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue  # gone, or not ours to inspect
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target in wanted:
                found.append(int(entry))
                break
    return sorted(found)


class _Drain:
    """Reads a child's stdout and stderr until both close, the child times out, or the grace
    period after its exit runs out."""

    def __init__(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        import selectors

        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.deadline = deadline
        self.out_fd, self.err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        self.streams = {self.out_fd: bytearray(), self.err_fd: bytearray()}
        self.inodes = [os.fstat(fd).st_ino for fd in self.streams]
        self.sel = selectors.DefaultSelector()
        for fd in self.streams:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ)
        self.drain_until: float | None = None
        self.timed_out = self.group_killed = False

    def _limit(self, now: float) -> float | None:
        """Note an exit, a timeout or the end of the grace; read until the time returned (None:
        stop reading)."""
        proc = self.proc
        if self.drain_until is None:
            if proc.poll() is not None:
                self.drain_until = now + PIPE_GRACE_S
            elif now >= self.deadline:
                self.timed_out = self.group_killed = True
                _kill_group(proc)
                proc.wait()
                self.drain_until = time.monotonic() + PIPE_GRACE_S
        if self.drain_until is not None and now >= self.drain_until:
            if self.group_killed:
                return None
            # The child is gone but its pipes are not: end what is left of its process
            # group, then give the pipes a moment; whoever still holds them is detached.
            self.group_killed = True
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.drain_until = now + 0.2
        return self.drain_until if self.drain_until is not None else self.deadline

    def _read(self, wait: float) -> None:
        for key, _ in self.sel.select(wait):
            fd = int(key.fd)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                self.streams[fd] += chunk
            else:
                self.sel.unregister(fd)

    def run(self) -> list[int] | None:
        """Read to the end; the pids of detached holders, or None when the pipes closed."""
        try:
            while self.sel.get_map():
                now = time.monotonic()
                limit = self._limit(now)
                if limit is None:
                    break
                # Wake at least every 0.1 s to notice an exit whose pipes a descendant keeps open.
                self._read(max(0.0, min(0.1, limit - now)))
            return pipe_holders(self.inodes) if self.sel.get_map() else None
        finally:
            self.sel.close()
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.proc.stdout.close()
            self.proc.stderr.close()


def _collect(
    proc: subprocess.Popen[bytes], timeout: float
) -> tuple[bytes, bytes, bool, list[int] | None]:
    """Read the child's stdout and stderr until both close, the child times out, or the grace
    period after its exit runs out. Returns (stdout, stderr, timed_out, detached holders or
    None when the pipes closed normally)."""
    if os.name == "nt":  # pragma: no cover - no select() on Windows pipes: plain communicate
        try:
            out, err = proc.communicate(timeout=timeout)
            return out, err, False, None
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            return out, err, True, None
    deadline = time.monotonic() + timeout
    drain = _Drain(proc, deadline)
    holders = drain.run()
    timed_out = drain.timed_out
    if proc.poll() is None:  # only reached when the pipes closed before the child exited
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
    return (
        bytes(drain.streams[drain.out_fd]),
        bytes(drain.streams[drain.err_fd]),
        timed_out,
        holders,
    )


def detached_note(holders: list[int] | None) -> str:
    """The note for a result whose pipes a detached descendant kept open ('' when none did)."""
    if holders is None:
        return ""
    who = f" (pid {', '.join(map(str, holders))})" if holders else ""
    return (
        f"; a detached process{who} kept its stdout/stderr open, so output was read for "
        f"{PIPE_GRACE_S:g} s more and then left"
    )


@dataclasses.dataclass(frozen=True)
class Finished:
    """How a child ended: its output, exit status and time taken."""

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    holders: list[int] | None  # detached processes that kept its pipes open (None: none did)
    duration: float


def _spawn(argv: list[str], env: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else child_env(),
        start_new_session=True,  # so a timeout kills the probe's own children too
    )


def _wait(proc: subprocess.Popen[bytes], timeout: float, start: float) -> Finished:
    """Collect the child's output within its time limit (killing its group on the way out)."""
    try:
        raw_out, raw_err, timed_out, holders = _collect(proc, timeout)
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    assert proc.returncode is not None
    return Finished(
        raw_out.decode(errors="replace"),
        raw_err.decode(errors="replace"),
        proc.returncode,
        timed_out,
        holders,
        time.perf_counter() - start,
    )


def _ended_badly(done: Finished, out: Output, timeout: float) -> str | None:
    """Why the child gave no usable result (timeout, signal, protocol, no result), or None."""
    note = detached_note(done.holders)
    where = f" in stage '{out.stage}'" if out.stage else " before its first stage"
    if done.timed_out:
        return f"timed out after {timeout:g} s{where}{note}"
    if done.returncode < 0:
        try:
            signame = signal.Signals(-done.returncode).name
        except ValueError:
            signame = f"signal {-done.returncode}"
        return f"died with {signame}{where}{note}"
    if out.error is not None:
        return f"broke the {MARK} line protocol{where}: {out.error}{note}"
    if out.result is None:
        return f"exited with code {done.returncode}{where} without a result{note}"
    return None


def report(name: str, timeout: float, done: Finished) -> ProbeResult:
    """The result of a finished child: its own result line, or what went wrong."""
    out = parse(done.stdout)
    tail = _tail(done.stderr)
    problem = _ended_badly(done, out, timeout)
    if problem is not None or out.result is None:
        return ProbeResult(name, "failed", str(problem), out.stage, {}, done.duration, tail)
    result = out.result
    return ProbeResult(
        name=name,
        status=result["status"],
        message=str(result.get("message", "")),
        stage=result.get("stage", out.stage),
        data=result.get("data") or {},
        duration=done.duration,
        stderr_tail=tail if result["status"] != "passed" else "",
    )


def run_subprocess(
    argv: list[str], name: str, timeout: float, env: Mapping[str, str] | None = None
) -> ProbeResult:
    """Run a child speaking the ``@@unsloth-probe`` protocol; turn what happened into a result.

    The time limit holds even when a descendant escapes the process group and keeps the pipes
    open: the child's result is taken as soon as it exits (or is killed), plus a short grace.
    """
    start = time.perf_counter()
    try:
        proc = _spawn(argv, env)
    except OSError as exc:
        return ProbeResult(name, "failed", f"could not start {argv[0]}: {exc}")
    return report(name, timeout, _wait(proc, timeout, start))


def run_probe(name: str, timeout: float, env: Mapping[str, str] | None = None) -> ProbeResult:
    """Run the built-in probe NAME in a fresh interpreter."""
    argv = [sys.executable, "-m", "pytest_unsloth.probes", name]
    return run_subprocess(argv, name, timeout, env)


@dataclasses.dataclass(frozen=True)
class Job:
    """One probe to run: its name and the GPUs it is pinned to (None: the process's own view)."""

    name: str
    pin: Pin | None = None

    @property
    def key(self) -> str:
        """What its result is stored under (results, run directory, cache): the probe's name,
        or ``NAME@GPUS`` when pinned."""
        return self.name if self.pin is None else self.pin.key(self.name)


class ProbeStore:
    """Runs probes concurrently, each at most once per session (and per xdist run).

    A probe is asked for by name, optionally pinned to GPUs (``Pin``); each (name, pin) is one
    ``Job`` whose ``key`` names its result everywhere it is kept.
    """

    def __init__(
        self,
        settings: Settings,
        nvml: NvmlSnapshot | None = None,
        run_dir: Path | None = None,
        cache: ProbeCache | None = None,
    ) -> None:
        self.settings = settings
        self._nvml = nvml
        self.run_dir = run_dir
        self.cache = cache  # results remembered between runs (None: -p no:cacheprovider)
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._results: dict[str, ProbeResult] = {}

    @property
    def nvml(self) -> NvmlSnapshot:
        """NVML snapshot deciding whether GPU probes apply (read once)."""
        if self._nvml is None:
            from pytest_unsloth.gpu import read_snapshot

            self._nvml = read_snapshot()
        return self._nvml

    def _not_applicable(self, name: str, pin: Pin | None = None) -> ProbeResult | None:
        from pytest_unsloth.util.versions import version_of

        dist = PROBE_DISTS[name]
        if version_of(dist) is None:
            return ProbeResult(name, "skipped", f"{dist} is not installed")
        nvml = self.nvml
        if not nvml.available:
            return ProbeResult(name, "skipped", f"no NVIDIA GPU: NVML says {nvml.error}")
        if pin is not None:
            return None  # the caller chose the GPUs from the machine's view
        if not nvml.visible:
            if nvml.devices:
                why = f"CUDA_VISIBLE_DEVICES={nvml.cuda_visible_devices!r} hides all "
                why += f"{len(nvml.devices)} GPU(s)"
                return ProbeResult(name, "skipped", f"no GPU visible: {why}")
            return ProbeResult(name, "skipped", "no NVIDIA GPU: NVML reports 0 devices")
        need = PROBE_MIN_GPUS.get(name, 1)
        if len(nvml.visible) < need:
            return ProbeResult(
                name, "skipped", f"needs {need} visible GPUs, {len(nvml.visible)} visible"
            )
        return None

    def _limits(self, name: str, pin: Pin | None = None) -> tuple[float, dict[str, str] | None]:
        """(timeout, child environment) for probe NAME; nccl retries inside its own child."""
        env = None if pin is None else pin.environ()
        if name == "nccl":
            from pytest_unsloth.probes.nccl import parent_limits

            return parent_limits(self.settings.nccl_timeout, env or child_env())
        return self.settings.probe_timeout, env

    def _produce(self, job: Job) -> ProbeResult:
        early = self._not_applicable(job.name, job.pin)
        if early is not None:
            return early
        timeout, env = self._limits(job.name, job.pin)
        if self.cache is None:
            return run_probe(job.name, timeout, env)
        # The lock makes a second pytest process wait and then reuse this one's result.
        with self.cache.lock(job.key):
            cached = self.cache.lookup(job.key)
            if cached is not None:
                return cached
            result = run_probe(job.name, timeout, env)
            self.cache.store(result, job.key)
            return result

    def _produce_shared(self, job: Job, run_dir: Path) -> ProbeResult:
        """Produce the job once for all xdist workers; an unusable run folder only costs sharing."""
        target = run_dir / f"{job.key}.json"
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(file_lock(run_dir / f"{job.key}.lock"))
            except OSError:
                return self._produce(job)
            shared = read_json(target)
            if isinstance(shared, dict):
                with contextlib.suppress(TypeError):
                    return dataclasses.replace(ProbeResult.from_json(shared), origin="shared")
            result = self._produce(job)
            with contextlib.suppress(OSError):
                write_json_atomic(target, result.to_json())
            return result

    def _worker(self, job: Job) -> None:
        try:
            if self.run_dir is None:
                result = self._produce(job)
            else:
                # Another xdist worker may hold the lock and be running this probe: wait for it
                # and reuse its result instead of probing twice.
                result = self._produce_shared(job, self.run_dir)
        except Exception as exc:  # a bug here must fail one check, not the session
            result = ProbeResult(job.name, "failed", f"probe runner error: {exc!r}")
        with self._lock:
            self._results[job.key] = result
            self._events[job.key].set()

    def start(self, names: Iterable[str], pin: Pin | None = None) -> None:
        """Start every named probe that is not started yet, all at once (pinned to ``pin``)."""
        for name in names:
            if name not in PROBE_DISTS:
                raise KeyError(f"unknown probe {name!r}; known: {', '.join(PROBE_NAMES)}")
            job = Job(name, pin)
            with self._lock:
                if job.key in self._events:
                    continue
                self._events[job.key] = threading.Event()
            threading.Thread(
                target=self._worker, args=(job,), daemon=True, name=f"unsloth-probe-{job.key}"
            ).start()

    def get(self, name: str, pin: Pin | None = None) -> ProbeResult:
        """The probe's result, starting it if needed and waiting for it."""
        self.start([name], pin)
        key = Job(name, pin).key
        self._events[key].wait()
        if self.cache is not None:
            self.cache.warn_pending()  # here, in the main thread, pytest records the warning
        return self._results[key]

    def results(self) -> dict[str, ProbeResult]:
        """Results finished so far, by job key (the probe's name when it was not pinned)."""
        with self._lock:
            return dict(self._results)


PROBE_STORE_KEY = pytest.StashKey[ProbeStore]()


def run_dir_for(config: pytest.Config) -> Path | None:
    """The directory xdist workers of one run share probe results through (None without xdist)."""
    workerinput = getattr(config, "workerinput", None)
    if not workerinput or "testrunuid" not in workerinput:
        return None
    return run_dir_path(str(workerinput["testrunuid"]))


def run_dir_path(testrunuid: str) -> Path:
    """The shared folder of the xdist run ``testrunuid`` (the controller removes it at the end)."""
    return Path(tempfile.gettempdir()) / f"pytest-unsloth-{testrunuid}"


def get_probe_store(config: pytest.Config) -> ProbeStore:
    """The session's probe store, created on first use."""
    store = config.stash.get(PROBE_STORE_KEY, None)
    if store is None:
        from pytest_unsloth.probes.cache import make_cache
        from pytest_unsloth.settings import get_settings

        settings = get_settings(config)
        store = ProbeStore(settings, run_dir=run_dir_for(config))
        store.cache = make_cache(config, settings, lambda: store.nvml)
        config.stash[PROBE_STORE_KEY] = store
    return store
