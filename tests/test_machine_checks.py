"""The machine checks (launcher, shm, disk, compiler, platform) against fake hosts and NVML."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuspecs import fake_gpu
from pytest_unsloth.checks import machine
from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.settings import Settings

needs_trainer = pytest.mark.skipif(
    not any(importlib.util.find_spec(m) for m in ("unsloth", "trl", "transformers")),
    reason="launcher only fails where a single-process trainer is installed (not the minimal env)",
)


GIB = 1024**3
H200 = fake_gpu("H200", free_gib=139.0)
L40S = fake_gpu("L40S", free_gib=44.0)


def statvfs(total: float, free: float) -> Callable[[str], Any]:
    """A statvfs answering with the given sizes in bytes (4 KiB blocks), like os.statvfs."""

    def fake(path: str) -> Any:
        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such file or directory", path)
        return types.SimpleNamespace(
            f_frsize=4096, f_blocks=int(total) // 4096, f_bavail=int(free) // 4096
        )

    return fake


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> machine.Host:
    """A host whose files live under tmp_path (nothing exists until a test creates it)."""
    root = tmp_path / "host"
    root.mkdir()
    (root / "dev" / "shm").mkdir(parents=True)
    h = machine.Host(
        proc_version=root / "proc/version",
        dockerenv=root / ".dockerenv",
        containerenv=root / "run/.containerenv",
        cgroup=root / "proc/1/cgroup",
        shm=root / "dev/shm",
        wsl_lib=root / "usr/lib/wsl/lib",
        environ={"HF_HOME": str(root / "hf")},
        statvfs=statvfs(64 * 1024**2, 60 * 1024**2),
        ldconfig=lambda: "",
        which=lambda name: None,
        system=lambda: "Linux",
        python_include=lambda: str(root / "include"),
    )
    monkeypatch.setattr(machine, "HOST", h)
    return h


def ctx(tmp_path: Path, **settings: Any) -> CheckContext:
    return CheckContext(Settings(**settings), tmp_path)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# launcher


@needs_trainer
def test_launcher_fails_for_two_gpus_in_a_plain_process(
    fake_nvml: Callable[..., Any], host: machine.Host, tmp_path: Path
) -> None:
    fake_nvml(gpus=[H200, H200])
    with pytest.raises(CheckFailed) as exc:
        machine.check_launcher(ctx(tmp_path))
    f = exc.value
    assert "2 GPUs visible (cuda:0 (NVIDIA H200), cuda:1 (NVIDIA H200))" in f.found
    assert "transformers" in f.found  # installed here: a single-process trainer
    assert "cuda:0 and cuda:1" in f.why
    assert "CUDA_VISIBLE_DEVICES=0" in f.fix and "torchrun --nproc-per-node 2" in f.fix


def test_launcher_passes_under_torchrun(
    fake_nvml: Callable[..., Any], host: machine.Host, tmp_path: Path
) -> None:
    fake_nvml(gpus=[H200, H200])
    host.environ = {"TORCHELASTIC_RUN_ID": "x1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    detail = machine.check_launcher(ctx(tmp_path))
    assert detail.startswith("under torchrun (TORCHELASTIC_RUN_ID=x1, LOCAL_RANK=1, WORLD_SIZE=2)")


def test_launcher_passes_for_one_gpu_and_when_cuda_visible_devices_picks_one(
    fake_nvml: Callable[..., Any],
    host: machine.Host,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_nvml(gpus=[H200, H200])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert machine.check_launcher(ctx(tmp_path)).startswith("one GPU visible (cuda:0")


def test_launcher_more_local_ranks_than_gpus(
    fake_nvml: Callable[..., Any], host: machine.Host, tmp_path: Path
) -> None:
    fake_nvml(gpus=[H200, H200])
    host.environ = {"LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    with pytest.raises(CheckFailed, match="4 ranks on this machine"):
        machine.check_launcher(ctx(tmp_path))


def test_launcher_mixed_models_need_pci_bus_order(
    fake_nvml: Callable[..., Any], host: machine.Host, tmp_path: Path
) -> None:
    fake_nvml(gpus=[L40S, H200])
    host.environ = {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    with pytest.raises(CheckFailed) as exc:
        machine.check_launcher(ctx(tmp_path))
    assert "CUDA_DEVICE_ORDER is unset" in exc.value.found
    assert exc.value.fix == "export CUDA_DEVICE_ORDER=PCI_BUS_ID (before Python starts)"
    host.environ = {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert machine.check_launcher(ctx(tmp_path)).startswith("under ")


def test_launcher_skips_without_gpu(
    fake_nvml: Callable[..., Any], host: machine.Host, tmp_path: Path
) -> None:
    fake_nvml(no_driver=True)
    with pytest.raises(CheckSkipped, match="NVML Shared Library Not Found"):
        machine.check_launcher(ctx(tmp_path))


# ----------------------------------------------------------------------------------------------
# shm


def test_shm_docker_default_fails(host: machine.Host, tmp_path: Path) -> None:
    host.dockerenv.write_text("")
    with pytest.raises(CheckFailed) as exc:
        machine.check_shm(ctx(tmp_path))
    f = exc.value
    assert f.found.startswith(f"{host.shm} is 0.1 GiB (0.1 GiB free) in a container")
    assert "needs 1.0 GiB" in f.found
    assert "--ipc=host" in f.fix and "--shm-size" in f.fix and "(threshold: default)" in f.fix


@pytest.mark.parametrize(
    "cgroup",
    ["0::/kubepods/burstable/pod1/abc\n", "12:memory:/docker/0123abcd\n"],
)
def test_shm_container_seen_through_cgroup(host: machine.Host, tmp_path: Path, cgroup: str) -> None:
    _write(host.cgroup, cgroup)
    with pytest.raises(CheckFailed, match="mentions"):
        machine.check_shm(ctx(tmp_path))


def test_shm_large_enough_or_not_in_a_container_passes(host: machine.Host, tmp_path: Path) -> None:
    _write(host.cgroup, "0::/init.scope\n")
    assert "below 1.0 GiB but not in a container" in machine.check_shm(ctx(tmp_path))
    host.dockerenv.write_text("")
    host.statvfs = statvfs(16 * GIB, 15 * GIB)
    assert machine.check_shm(ctx(tmp_path)).endswith(f"in a container ({host.dockerenv})")


def test_shm_threshold_is_configurable(host: machine.Host, tmp_path: Path) -> None:
    host.dockerenv.write_text("")
    assert machine.check_shm(ctx(tmp_path, min_shm_gib=0.05))
    with pytest.raises(CheckFailed):
        machine.check_shm(ctx(tmp_path, min_shm_gib=1.0))


def test_shm_missing_in_container(host: machine.Host, tmp_path: Path) -> None:
    host.dockerenv.write_text("")
    host.shm = host.shm.parent / "nope"
    with pytest.raises(CheckFailed, match="no usable"):
        machine.check_shm(ctx(tmp_path))


def test_real_statvfs_of_a_folder_passes_outside_container(
    host: machine.Host, tmp_path: Path
) -> None:
    host.statvfs = os.statvfs
    assert "GiB free" in machine.check_shm(ctx(tmp_path, min_shm_gib=0.0001))


# ----------------------------------------------------------------------------------------------
# disk


def test_disk_floor(host: machine.Host, tmp_path: Path) -> None:
    host.statvfs = statvfs(100 * GIB, 5 * GIB)
    with pytest.raises(CheckFailed) as exc:
        machine.check_disk(ctx(tmp_path))
    f = exc.value
    # cache and output share one file system: one line, the floor once (not twice)
    assert "Hub cache" in f.found and "and output directory" in f.found
    assert "5.0 GiB free, needs 10.0 GiB (basis: 10 GiB (default))" in f.found
    assert "No space left on device" in f.why
    host.statvfs = statvfs(100 * GIB, 11 * GIB)
    assert "11.0 GiB free" in machine.check_disk(ctx(tmp_path))


def test_disk_cache_from_hf_hub_cache_and_output_dir_from_grpo_config(
    host: machine.Host, tmp_path: Path
) -> None:
    host.environ = {"HF_HUB_CACHE": str(tmp_path / "cache")}
    host.statvfs = statvfs(100 * GIB, 50 * GIB)
    detail = machine.check_disk(
        ctx(tmp_path, grpo_config={"output_dir": "runs/x"}, min_free_disk_gib=20.0)
    )
    assert f"Hub cache {tmp_path / 'cache'}" in detail
    assert f"output directory {tmp_path / 'runs/x'}" in detail


def _model(folder: Path, total: int, config: dict[str, Any]) -> Path:
    index = {"metadata": {"total_size": total}, "weight_map": {}}
    _write(folder / "model.safetensors.index.json", json.dumps(index))
    _write(folder / "config.json", json.dumps(config))
    return folder


def test_disk_uses_the_models_size_for_a_merged_save(host: machine.Host, tmp_path: Path) -> None:
    folder = _model(
        tmp_path / "m",
        3 * GIB,
        {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
    )
    host.statvfs = statvfs(100 * GIB, 11 * GIB)
    with pytest.raises(CheckFailed) as exc:
        machine.check_disk(ctx(tmp_path, model=str(folder)))
    # a local folder needs no download; the merged 16-bit save of 4-bit weights needs 4x
    assert "needs 12.0 GiB" in exc.value.found
    assert "model.safetensors.index.json total_size" in exc.value.found
    assert "4-bit weights x 4" in exc.value.found
    host.statvfs = statvfs(100 * GIB, 13 * GIB)
    assert "merged 16-bit save needs 12.0 GiB" in machine.check_disk(
        ctx(tmp_path, model=str(folder))
    )


def test_disk_model_in_hub_cache(host: machine.Host, tmp_path: Path) -> None:
    cache = tmp_path / "hf" / "hub"
    host.environ = {"HF_HOME": str(tmp_path / "hf")}
    snap = cache / "models--org--tiny" / "snapshots" / "abc"
    _model(snap, 2 * GIB, {"torch_dtype": "bfloat16"})
    host.statvfs = statvfs(100 * GIB, 3 * GIB)
    detail = machine.check_disk(ctx(tmp_path, model="org/tiny"))
    assert "org/tiny: 2.0 GiB" in detail and "16-bit weights" in detail


# ----------------------------------------------------------------------------------------------
# compiler


@pytest.fixture
def with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    real = CheckContext.dist

    def dist(self: CheckContext, name: str) -> Any:
        return object() if name == "triton" else real(self, name)

    monkeypatch.setattr(CheckContext, "dist", dist)


def test_compiler_skips_without_triton(host: machine.Host, tmp_path: Path) -> None:
    with pytest.raises(CheckSkipped, match="triton is not installed"):
        machine.check_compiler(ctx(tmp_path))


def test_compiler_no_cc_no_headers(
    host: machine.Host, tmp_path: Path, with_triton: None, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(no_driver=True)
    with pytest.raises(CheckFailed) as exc:
        machine.check_compiler(ctx(tmp_path))
    f = exc.value
    assert "no C compiler (CC unset; gcc, clang, cc not on PATH)" in f.found
    assert "no Python.h in" in f.found
    assert "Failed to find C compiler" in f.why
    assert "build-essential" in f.fix and "-dev" in f.fix
    assert "libcuda" not in f.found  # no GPU: libcuda is not expected


def test_compiler_libcuda_from_ldconfig_or_triton_variable(
    host: machine.Host, tmp_path: Path, with_triton: None, fake_nvml: Callable[..., Any]
) -> None:
    fake_nvml(gpus=[H200])
    host.which = lambda name: "/usr/bin/gcc" if name == "gcc" else None
    _write(Path(host.python_include()) / "Python.h", "")
    with pytest.raises(CheckFailed, match=r"libcuda\.so\.1 is not in ldconfig's cache"):
        machine.check_compiler(ctx(tmp_path))
    host.ldconfig = lambda: (
        "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
    )
    detail = machine.check_compiler(ctx(tmp_path))
    assert detail == (
        "C compiler /usr/bin/gcc, Python.h, libcuda /usr/lib/x86_64-linux-gnu/libcuda.so.1"
    )
    host.ldconfig = lambda: ""
    host.environ = {"TRITON_LIBCUDA_PATH": str(tmp_path)}
    assert f"libcuda {tmp_path}" in machine.check_compiler(ctx(tmp_path))


def test_compiler_bad_cc_variable(host: machine.Host, tmp_path: Path, with_triton: None) -> None:
    host.environ = {"CC": "/opt/nothing/gcc"}
    with pytest.raises(CheckFailed, match="CC=/opt/nothing/gcc does not exist"):
        machine.check_compiler(ctx(tmp_path))


def test_compiler_nvcc_for_run_time_builders(
    host: machine.Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        CheckContext,
        "dist",
        lambda self, name: object() if name in ("triton", "deepspeed") else None,
    )
    host.which = lambda name: "/usr/bin/gcc" if name == "gcc" else None
    _write(Path(host.python_include()) / "Python.h", "")
    host.environ = {"CUDA_HOME": str(tmp_path / "cuda")}
    with pytest.raises(CheckFailed, match="deepspeed build CUDA extensions at run time"):
        machine.check_compiler(ctx(tmp_path))
    nvcc = _write(tmp_path / "cuda" / "bin" / "nvcc", "")
    assert f"nvcc {nvcc}" in machine.check_compiler(ctx(tmp_path))


# ----------------------------------------------------------------------------------------------
# platform

WSL_VERSION = (
    "Linux version 5.15.167.4-microsoft-standard-WSL2 (root@f9c826d3017f) (gcc (GCC) 11.2.0) #1\n"
)


def test_platform_native_linux(host: machine.Host, tmp_path: Path) -> None:
    _write(host.proc_version, "Linux version 6.8.0-45-generic (buildd@lcy02) #45-Ubuntu\n")
    assert machine.check_platform(ctx(tmp_path)) == "Linux 6.8.0-45-generic"


def test_platform_wsl_healthy(host: machine.Host, tmp_path: Path) -> None:
    _write(host.proc_version, WSL_VERSION)
    host.wsl_lib.mkdir(parents=True)
    host.ldconfig = lambda: f"\tlibcuda.so.1 (libc6,x86-64) => {host.wsl_lib}/libcuda.so.1\n"
    assert machine.check_platform(ctx(tmp_path)).startswith(
        "WSL 2 (kernel 5.15.167.4-microsoft-standard-WSL2)"
    )


def test_platform_wsl_with_a_linux_driver_inside(host: machine.Host, tmp_path: Path) -> None:
    _write(host.proc_version, WSL_VERSION)
    host.wsl_lib.mkdir(parents=True)
    host.ldconfig = lambda: (
        "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
        f"\tlibcuda.so.1 (libc6,x86-64) => {host.wsl_lib}/libcuda.so.1\n"
    )
    with pytest.raises(CheckFailed) as exc:
        machine.check_platform(ctx(tmp_path))
    assert "Linux NVIDIA driver's libcuda is installed inside WSL" in exc.value.found
    assert "apt-get remove --purge" in exc.value.fix


def test_platform_wsl_lib_missing_or_off_the_loader_path(
    host: machine.Host, tmp_path: Path
) -> None:
    _write(host.proc_version, WSL_VERSION)
    with pytest.raises(CheckFailed, match="is missing"):
        machine.check_platform(ctx(tmp_path))
    host.wsl_lib.mkdir(parents=True)
    with pytest.raises(CheckFailed, match="not on the loader path") as exc:
        machine.check_platform(ctx(tmp_path))
    assert f"LD_LIBRARY_PATH={host.wsl_lib}" in exc.value.fix
    host.environ = {"LD_LIBRARY_PATH": str(host.wsl_lib)}
    assert machine.check_platform(ctx(tmp_path)).startswith("WSL 2")


def test_platform_native_windows_needs_triton_windows(
    host: machine.Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.system = lambda: "Windows"
    installed = {"unsloth"}
    monkeypatch.setattr(
        CheckContext, "dist", lambda self, name: object() if name in installed else None
    )
    with pytest.raises(CheckFailed, match="no triton-windows") as exc:
        machine.check_platform(ctx(tmp_path))
    assert exc.value.fix.startswith("pip install triton-windows")
    installed.add("triton-windows")
    assert machine.check_platform(ctx(tmp_path)).startswith("Windows")


def test_host_default_reads_the_real_machine() -> None:
    h = machine.Host()
    assert h.env is os.environ
    assert dataclasses.fields(h)
