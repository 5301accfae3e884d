"""Kernel probes: each in its own ``python -m pytest_unsloth.probes NAME`` child with a timeout.

The pytest process never imports torch or touches CUDA. Probes run concurrently, at most once
per session, and once per xdist run (workers share results through a locked run directory).
A probe that hangs is killed (its whole process group) and reported with the stage it reached;
one that dies by a signal is reported with the signal's name and the tail of its stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_unsloth.gpu import NvmlSnapshot
    from pytest_unsloth.probes.cache import ProbeCache
    from pytest_unsloth.settings import Settings

# Probe name -> the distribution whose presence makes it applicable.
PROBE_DISTS: dict[str, str] = {
    "torch": "torch",
    "bitsandbytes": "bitsandbytes",
    "triton": "triton",
    "flash-attn": "flash-attn",
    "xformers": "xformers",
    "unsloth": "unsloth",
    "vllm": "vllm",
    "nccl": "torch",
}
# Probes that need more than one visible GPU (skipped with the count otherwise).
PROBE_MIN_GPUS: dict[str, int] = {"nccl": 2}
PROBE_NAMES: tuple[str, ...] = tuple(PROBE_DISTS)
KERNEL_PROBES: tuple[str, ...] = tuple(n for n in PROBE_NAMES if n != "torch")

MARK = "@@unsloth-probe"
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
class ProbeResult:
    """What a probe found. ``status`` is passed, failed or skipped."""

    name: str
    status: str
    message: str
    stage: str | None = None
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    duration: float = 0.0
    stderr_tail: str = ""
    origin: str = "run"  # run: probed now; shared: by another xdist worker; cache: earlier run
    age_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProbeResult:
        """Inverse of ``to_json`` (unknown keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


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


def _parse_output(stdout: str) -> tuple[str | None, dict[str, Any] | None]:
    stage: str | None = None
    result: dict[str, Any] | None = None
    for line in stdout.splitlines():
        if not line.startswith(MARK):
            continue
        kind, _, payload = line[len(MARK) :].strip().partition(" ")
        if kind == "stage":
            stage = payload
        elif kind == "result":
            with contextlib.suppress(ValueError):
                result = json.loads(payload)
    return stage, result


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


def _collect(
    proc: subprocess.Popen[bytes], timeout: float
) -> tuple[bytes, bytes, bool, list[int] | None]:
    """Read the child's stdout and stderr until both close, the child times out, or the grace
    period after its exit runs out. Returns (stdout, stderr, timed_out, detached holders or
    None when the pipes closed normally)."""
    import selectors

    assert proc.stdout is not None and proc.stderr is not None
    if os.name == "nt":  # pragma: no cover - no select() on Windows pipes: plain communicate
        try:
            out, err = proc.communicate(timeout=timeout)
            return out, err, False, None
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            return out, err, True, None
    streams = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    inodes = [os.fstat(fd).st_ino for fd in streams]
    sel = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    drain_until: float | None = None
    timed_out = group_killed = False
    try:
        while sel.get_map():
            now = time.monotonic()
            if drain_until is None:
                if proc.poll() is not None:
                    drain_until = now + PIPE_GRACE_S
                elif now >= deadline:
                    timed_out = group_killed = True
                    _kill_group(proc)
                    proc.wait()
                    drain_until = time.monotonic() + PIPE_GRACE_S
            if drain_until is not None and now >= drain_until:
                if group_killed:
                    break
                # The child is gone but its pipes are not: end what is left of its process
                # group, then give the pipes a moment; whoever still holds them is detached.
                group_killed = True
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                drain_until = now + 0.2
            # Wake at least every 0.1 s to notice an exit whose pipes a descendant keeps open.
            limit = drain_until if drain_until is not None else deadline
            for key, _ in sel.select(max(0.0, min(0.1, limit - now))):
                fd = int(key.fd)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    streams[fd] += chunk
                else:
                    sel.unregister(fd)
        holders = pipe_holders(inodes) if sel.get_map() else None
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    if proc.poll() is None:  # only reached when the pipes closed before the child exited
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
    return bytes(streams[out_fd]), bytes(streams[err_fd]), timed_out, holders


def detached_note(holders: list[int] | None) -> str:
    """The note for a result whose pipes a detached descendant kept open ('' when none did)."""
    if holders is None:
        return ""
    who = f" (pid {', '.join(map(str, holders))})" if holders else ""
    return (
        f"; a detached process{who} kept its stdout/stderr open, so output was read for "
        f"{PIPE_GRACE_S:g} s more and then left"
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
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else child_env(),
            start_new_session=True,  # so a timeout kills the probe's own children too
        )
    except OSError as exc:
        return ProbeResult(name, "failed", f"could not start {argv[0]}: {exc}")
    try:
        raw_out, raw_err, timed_out, holders = _collect(proc, timeout)
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    out = raw_out.decode(errors="replace")
    err = raw_err.decode(errors="replace")
    note = detached_note(holders)
    duration = time.perf_counter() - start
    stage, result = _parse_output(out)
    tail = _tail(err)
    where = f" in stage '{stage}'" if stage else " before its first stage"
    if timed_out:
        return ProbeResult(
            name,
            "failed",
            f"timed out after {timeout:g} s{where}{note}",
            stage,
            {},
            duration,
            tail,
        )
    assert proc.returncode is not None
    if proc.returncode < 0:
        try:
            signame = signal.Signals(-proc.returncode).name
        except ValueError:
            signame = f"signal {-proc.returncode}"
        return ProbeResult(
            name, "failed", f"died with {signame}{where}{note}", stage, {}, duration, tail
        )
    if result is None:
        return ProbeResult(
            name,
            "failed",
            f"exited with code {proc.returncode}{where} without a result{note}",
            stage,
            {},
            duration,
            tail,
        )
    return ProbeResult(
        name=name,
        status=str(result.get("status", "failed")),
        message=str(result.get("message", "")),
        stage=result.get("stage", stage),
        data=result.get("data") or {},
        duration=duration,
        stderr_tail=tail if result.get("status") != "passed" else "",
    )


def run_probe(name: str, timeout: float, env: Mapping[str, str] | None = None) -> ProbeResult:
    """Run the built-in probe NAME in a fresh interpreter."""
    argv = [sys.executable, "-m", "pytest_unsloth.probes", name]
    return run_subprocess(argv, name, timeout, env)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock shared between processes (no-op where flock is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a concurrent reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    """Read a JSON file; None when absent or unreadable."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


class ProbeStore:
    """Runs probes concurrently, each at most once per session (and per xdist run)."""

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
        from pytest_unsloth.meta import version_of

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

    def _produce(self, name: str, pin: Pin | None) -> ProbeResult:
        early = self._not_applicable(name, pin)
        if early is not None:
            return early
        key = name if pin is None else pin.key(name)
        timeout, env = self._limits(name, pin)
        if self.cache is None:
            return run_probe(name, timeout, env)
        # The lock makes a second pytest process wait and then reuse this one's result.
        with self.cache.lock(key):
            cached = self.cache.lookup(key)
            if cached is not None:
                return cached
            result = run_probe(name, timeout, env)
            self.cache.store(result, key)
            return result

    def _produce_shared(self, name: str, pin: Pin | None, run_dir: Path) -> ProbeResult:
        """Produce NAME once for all xdist workers; an unusable run folder only costs sharing."""
        key = name if pin is None else pin.key(name)
        target = run_dir / f"{key}.json"
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(file_lock(run_dir / f"{key}.lock"))
            except OSError:
                return self._produce(name, pin)
            shared = read_json(target)
            if isinstance(shared, dict):
                with contextlib.suppress(TypeError):
                    return dataclasses.replace(ProbeResult.from_json(shared), origin="shared")
            result = self._produce(name, pin)
            with contextlib.suppress(OSError):
                write_json_atomic(target, result.to_json())
            return result

    def _worker(self, name: str, pin: Pin | None) -> None:
        key = name if pin is None else pin.key(name)
        try:
            if self.run_dir is None:
                result = self._produce(name, pin)
            else:
                # Another xdist worker may hold the lock and be running this probe: wait for it
                # and reuse its result instead of probing twice.
                result = self._produce_shared(name, pin, self.run_dir)
        except Exception as exc:  # a bug here must fail one check, not the session
            result = ProbeResult(name, "failed", f"probe runner error: {exc!r}")
        with self._lock:
            self._results[key] = result
            self._events[key].set()

    def start(self, names: Iterable[str], pin: Pin | None = None) -> None:
        """Start every named probe that is not started yet, all at once (pinned to ``pin``)."""
        for name in names:
            if name not in PROBE_DISTS:
                raise KeyError(f"unknown probe {name!r}; known: {', '.join(PROBE_NAMES)}")
            key = name if pin is None else pin.key(name)
            with self._lock:
                if key in self._events:
                    continue
                self._events[key] = threading.Event()
            threading.Thread(
                target=self._worker, args=(name, pin), daemon=True, name=f"unsloth-probe-{key}"
            ).start()

    def get(self, name: str, pin: Pin | None = None) -> ProbeResult:
        """The probe's result, starting it if needed and waiting for it."""
        self.start([name], pin)
        key = name if pin is None else pin.key(name)
        self._events[key].wait()
        if self.cache is not None:
            self.cache.warn_pending()  # here, in the main thread, pytest records the warning
        return self._results[key]

    def results(self) -> dict[str, ProbeResult]:
        """Results finished so far."""
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
