"""Probe results remembered between runs: reused only when nothing that could change them did.

Each run is a separate pytest process (runpytest_subprocess) against a fake GPU (fake NVML) and
a fake ``vllm`` whose import appends a line to a log, so the log counts real probe runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from distfake import write_dist
from gpuspecs import fake_gpu
from subrun import run_pytest

H100 = fake_gpu("H100", uuid="GPU-aaaaaaaa-0000-0000-0000-000000000001", free_gib=79.0)


class Env:
    """A fake GPU box: fake NVML, fake vllm (logging each probe), fake torch for the child."""

    def __init__(
        self,
        pytester: pytest.Pytester,
        fake_nvml,
        monkeypatch: pytest.MonkeyPatch,
        *,
        vllm_ok: bool = True,
        sleep: float = 0.0,
    ) -> None:
        self.pytester = pytester
        self.nvml = fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
        self.site = pytester.path / "site"
        self.log = pytester.path / "probe-log"
        code = f"""
            import time
            with open({str(self.log)!r}, "a") as fh:
                fh.write("probed\\n")
            time.sleep({sleep})
            __version__ = "0.11.0"
        """
        self.vllm_info = write_dist(self.site, "vllm", "0.11.0", module="vllm", code=code)
        if vllm_ok:
            (self.site / "vllm" / "_C.py").write_text("")
        write_dist(
            self.site,
            "torch",
            "2.11.0+cu130",
            module="torch",
            code="__version__ = '2.11.0+cu130'\n",
        )
        monkeypatch.setenv("PYTHONPATH", f"{self.site}{os.pathsep}{os.environ['PYTHONPATH']}")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def run(self, *args: str) -> pytest.RunResult:
        result, _ = run_pytest(
            self.pytester,
            "--unsloth-env",
            "--unsloth-checks=vllm",
            "--unsloth-report=r.json",
            *args,
            timeout=120,
        )
        return result

    @property
    def probes(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0

    def record(self) -> dict[str, Any]:
        data = json.loads((self.pytester.path / "r.json").read_text())
        record: dict[str, Any] = data["checks"][0]["probes"][0]
        return record


@pytest.fixture
def env(pytester: pytest.Pytester, fake_nvml, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(pytester, fake_nvml, monkeypatch)


pytestmark = pytest.mark.slow


def test_second_run_reuses_the_passing_result(env: Env):
    env.run().assert_outcomes(passed=1)
    assert env.record()["origin"] == "run"
    result = env.run()
    result.assert_outcomes(passed=1)
    assert env.probes == 1
    rec = env.record()
    assert rec["origin"] == "cache" and rec["age_s"] >= 0
    result.stdout.fnmatch_lines(["vllm *passed *vllm 0.11.0 imported* [[]vllm from cache, * old]"])


def test_new_version_of_a_package_reprobes(env: Env):
    env.run()
    meta = env.vllm_info / "METADATA"
    meta.write_text(meta.read_text().replace("Version: 0.11.0", "Version: 0.11.1"))
    env.vllm_info.rename(env.vllm_info.with_name("vllm-0.11.1.dist-info"))
    env.run()
    assert env.probes == 2


def test_changed_record_reprobes(env: Env):
    env.run()
    (env.vllm_info / "RECORD").write_text("vllm/__init__.py,sha256=reinstalled,42\n")
    env.run()
    assert env.probes == 2


def test_changed_cuda_visible_devices_reprobes(env: Env, monkeypatch: pytest.MonkeyPatch):
    env.run()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    env.run()
    env.run()
    assert env.probes == 2


def test_different_driver_reprobes(env: Env):
    env.run()
    env.nvml.update(driver="580.200.01")
    env.run()
    assert env.probes == 2


def test_failed_probe_is_never_reused(
    pytester: pytest.Pytester, fake_nvml, monkeypatch: pytest.MonkeyPatch
):
    env = Env(pytester, fake_nvml, monkeypatch, vllm_ok=False)
    env.run().assert_outcomes(failed=1)
    env.run().assert_outcomes(failed=1)
    assert env.probes == 2


def test_old_entry_is_reprobed(env: Env):
    env.run()
    entry = env.pytester.path / ".pytest_cache" / "d" / "unsloth-probes" / "vllm.json"
    data = json.loads(entry.read_text())
    data["time"] -= 25 * 3600  # default max age: 24 h
    entry.write_text(json.dumps(data))
    env.run()
    assert env.probes == 2


def test_max_age_setting(env: Env):
    env.pytester.makeini("[pytest]\nunsloth_probe_cache_max_age = 0\n")
    env.run()
    env.run()
    assert env.probes == 2


@pytest.mark.parametrize(
    "flag", [("--cache-clear",), ("-p", "no:cacheprovider"), ("--unsloth-reprobe",)]
)
def test_flags_that_force_a_fresh_probe(env: Env, flag: tuple[str, ...]):
    env.run()
    env.run(*flag)
    assert env.probes == 2


def test_two_concurrent_runs_probe_once(
    pytester: pytest.Pytester, fake_nvml, monkeypatch: pytest.MonkeyPatch
):
    env = Env(pytester, fake_nvml, monkeypatch, sleep=3.0)
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "pytester",
        "--unsloth-env",
        "--unsloth-checks=vllm",
        "-q",
    ]
    procs = [
        subprocess.Popen(
            argv, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert env.probes == 1
    assert sum("from cache" in out for out in outs) == 1


def test_fingerprint_inputs_cover_what_can_change(fake_nvml):
    from pytest_unsloth.gpu import read_snapshot
    from pytest_unsloth.probes.cache import fingerprint, fingerprint_inputs

    fake_nvml(gpus=[H100], driver="580.159.04", cuda_driver=13000)
    nvml = read_snapshot()
    base = fingerprint_inputs(nvml, environ={})
    assert base["gpus"] == [[H100["uuid"], H100["name"]]]
    assert base["driver"] == "580.159.04"
    assert "LD_LIBRARY_PATH" in base["env"] and "PYTORCH_CUDA_ALLOC_CONF" in base["env"]
    changed = fingerprint_inputs(nvml, environ={"LD_LIBRARY_PATH": "/usr/local/cuda/lib64"})
    assert fingerprint(base) != fingerprint(changed)
    assert fingerprint(base) == fingerprint(fingerprint_inputs(nvml, environ={}))
