"""The probe runner: isolation (timeouts, signals, bad exits), concurrency, sharing, real probes."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from distfake import write_dist
from pytest_unsloth.probes.runner import ProbeStore, run_probe, run_subprocess, stderr_summary
from pytest_unsloth.settings import Settings

H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "total_gib": 79.6, "free_gib": 79.0}


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    src = str(Path(__file__).parents[1] / "src")
    header = f"import sys\nsys.path.insert(0, {src!r})\n"
    header += "from pytest_unsloth.probes import emit, stage, run\n"
    script.write_text(header + textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_result_line_is_parsed(tmp_path: Path):
    argv = _child(
        tmp_path,
        """
        print("library chatter on stdout")
        run("x", {"x": lambda: (stage("one"), emit("passed", "all good", answer=42))[1]})
    """,
    )
    res = run_subprocess(argv, "x", timeout=30)
    assert (res.status, res.message, res.stage, res.data["answer"]) == (
        "passed",
        "all good",
        "one",
        42,
    )


def test_timeout_kills_the_process_group_and_names_the_stage(tmp_path: Path):
    argv = _child(
        tmp_path,
        """
        import subprocess, time
        stage("spawn a grandchild")
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        stage("wait forever")
        time.sleep(60)
    """,
    )
    start = time.perf_counter()
    res = run_subprocess(argv, "x", timeout=2)
    assert time.perf_counter() - start < 10  # the grandchild holding the pipe was killed too
    assert res.status == "failed"
    assert res.message == "timed out after 2 s in stage 'wait forever'"


def test_signal_death_names_the_signal_and_keeps_stderr(tmp_path: Path):
    argv = _child(
        tmp_path,
        """
        import faulthandler, os, signal
        faulthandler.enable()
        stage("native call")
        os.kill(os.getpid(), signal.SIGSEGV)
    """,
    )
    res = run_subprocess(argv, "x", timeout=30)
    assert res.message == "died with SIGSEGV in stage 'native call'"
    assert "Fatal Python error: Segmentation fault" in res.stderr_tail
    assert stderr_summary(res.stderr_tail).startswith("Fatal Python error: Segmentation fault")


def test_exit_without_result(tmp_path: Path):
    argv = _child(
        tmp_path,
        """
        stage("import")
        sys.stderr.write("ImportError: libcudart.so.13: cannot open shared object file\\n")
        sys.exit(3)
    """,
    )
    res = run_subprocess(argv, "x", timeout=30)
    assert res.message == "exited with code 3 in stage 'import' without a result"
    assert (
        stderr_summary(res.stderr_tail)
        == "ImportError: libcudart.so.13: cannot open shared object file"
    )


def test_exception_in_probe_becomes_a_failed_result(tmp_path: Path):
    argv = _child(
        tmp_path,
        """
        def boom():
            stage("load")
            raise OSError("libbitsandbytes_cuda130.so: cannot open shared object file")
        run("x", {"x": boom})
    """,
    )
    res = run_subprocess(argv, "x", timeout=30)
    assert res.status == "failed"
    assert res.stage == "load"
    assert res.message == "OSError: libbitsandbytes_cuda130.so: cannot open shared object file"


def test_missing_interpreter_is_a_failed_result():
    res = run_subprocess(["/nonexistent/python"], "x", timeout=5)
    assert res.status == "failed" and "could not start" in res.message


def test_probe_not_installed_skips_without_a_subprocess(fake_nvml):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    store = ProbeStore(Settings())
    res = store.get("vllm")
    assert (res.status, res.message, res.duration) == ("skipped", "vllm is not installed", 0.0)


def test_no_gpu_skips_every_probe(fake_nvml, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_nvml(no_driver=True)
    write_dist(tmp_path / "site", "torch", "2.11.0+cu130")  # installed, so only the GPU decides
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    res = ProbeStore(Settings()).get("torch")
    assert res.status == "skipped"
    assert res.message == "no NVIDIA GPU: NVML says NVML Shared Library Not Found"


def _slow_fake(site: Path, dist: str, module: str, log: Path, seconds: float) -> None:
    write_dist(
        site,
        dist,
        "1.0",
        module=module,
        code=f"""
        import time
        with open({str(log)!r}, "a") as fh:
            fh.write("{module}\\n")
        time.sleep({seconds})
        __version__ = "1.0"
    """,
    )


@pytest.mark.slow
def test_probes_run_concurrently(fake_nvml, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    site = tmp_path / "site"
    log = tmp_path / "log"
    _slow_fake(site, "vllm", "vllm", log, 3)
    _slow_fake(site, "xformers", "xformers", log, 3)
    monkeypatch.syspath_prepend(str(site))
    store = ProbeStore(Settings())
    start = time.perf_counter()
    store.start(["vllm", "xformers"])
    results = [store.get("vllm"), store.get("xformers")]
    wall = time.perf_counter() - start
    assert all(r.status == "failed" for r in results)  # the fakes lack vllm._C / xformers.ops
    assert wall < 0.8 * sum(r.duration for r in results)


@pytest.mark.slow
def test_two_stores_sharing_a_run_dir_probe_once(
    fake_nvml, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    site = tmp_path / "site"
    log = tmp_path / "log"
    _slow_fake(site, "vllm", "vllm", log, 1)
    monkeypatch.syspath_prepend(str(site))
    run_dir = tmp_path / "run"
    stores = [ProbeStore(Settings(), run_dir=run_dir) for _ in range(2)]
    out: list[str] = []
    threads = [
        threading.Thread(target=lambda s=s: out.append(s.get("vllm").origin)) for s in stores
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.read_text().splitlines() == ["vllm"]
    assert sorted(out) == ["run", "shared"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_real_torch_probe_on_a_cpu_build():
    res = run_probe("torch", timeout=120)
    assert res.status == "failed"
    assert res.data["reason"] == "cpu-build"
    assert "is a CPU-only build" in res.message


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_round_trip_runs_for_real_on_cpu():
    """The same code the GPU probe runs, on bitsandbytes' CPU backend."""
    from pytest_unsloth.probes.kernels import nf4_round_trip

    res = nf4_round_trip("cpu")
    assert res["status"] == "passed", res
    assert 0 < res["data"]["mean_abs_error"] < 0.15
    assert res["data"]["max_abs_error"] < 1.0


def test_unknown_probe_name_is_refused():
    with pytest.raises(KeyError, match="unknown probe 'bnb'"):
        ProbeStore(Settings()).start(["bnb"])
