"""NVML inventory and CUDA_VISIBLE_DEVICES mapping (src/pytest_unsloth/gpu.py)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuspecs import fake_gpu
from pytest_unsloth import gpu

ON_GPU_MACHINE = os.environ.get("UNSLOTH_TEST_GPU") == "1"
GIB = 1024**3

L4 = fake_gpu("L4", free_gib=14.7)
T4 = fake_gpu("T4", free_gib=14.5)


def h100(i: int, free: float = 79.0) -> dict[str, Any]:
    return fake_gpu("H100", uuid=f"GPU-{i}aaa{i}bbb-1111-2222-3333-44445555666{i}", free_gib=free)


def a100_mig(i: int, n: int = 2) -> dict[str, Any]:
    return fake_gpu(
        "A100",
        uuid=f"GPU-a100{i}000-0000-0000-0000-00000000000{i}",
        free_gib=79.0,
        mig=[
            {
                "uuid": f"MIG-{i}{s}c0ffee-0000-0000-0000-000000000000",
                "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                "total_gib": 39.5,
                "free_gib": 39.0 - s,
            }
            for s in range(n)
        ],
    )


# ----------------------------------------------------------------------------------------------
# Real NVML without a driver


@pytest.mark.skipif(ON_GPU_MACHINE, reason="this machine has a driver")
def test_real_pynvml_without_driver_is_unavailable_fast() -> None:
    sys.modules.pop("pynvml", None)
    real = importlib.import_module("pynvml")
    assert "fakes" not in (real.__file__ or "")
    start = time.perf_counter()
    snap = gpu.read_snapshot()
    elapsed = time.perf_counter() - start
    assert not snap.available
    assert snap.error == "NVML Shared Library Not Found"
    assert snap.devices == ()
    assert snap.visible == ()
    assert snap.driver_version is None
    assert elapsed < 0.5


def test_pynvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    snap = gpu.read_snapshot()
    assert not snap.available
    assert snap.error is not None
    assert "pip install nvidia-ml-py" in snap.error


def test_read_snapshot_does_not_import_pynvml_at_module_import() -> None:
    code = "import sys, pytest_unsloth.gpu; print('pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# The fake imitates the real module


def test_fake_api_names_exist_in_real_pynvml(fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[L4])
    fake = importlib.import_module("pynvml")
    assert "fakes" in (fake.__file__ or "")
    real_path = next(
        Path(p) / "pynvml.py"
        for p in sys.path
        if (Path(p) / "pynvml.py").is_file() and "fakes" not in p
    )
    real_src = real_path.read_text(encoding="utf-8")
    for name in dir(fake):
        if name.startswith("nvml") and callable(getattr(fake, name)):
            if name in ("nvmlFriendlyObject",):
                continue
            assert f"def {name}(" in real_src or f"{name} = " in real_src, name
    real_errors = {"NVMLError_LibraryNotFound", "NVMLError_NotSupported", "NVMLError_GpuIsLost"}
    for cls_name in real_errors:
        cls = getattr(fake, cls_name)
        assert issubclass(cls, fake.NVMLError)
    err = fake.NVMLError(12)
    assert type(err) is fake.NVMLError_LibraryNotFound
    assert str(err) == "NVML Shared Library Not Found"
    assert str(fake.NVMLError_NotSupported()) == "Not Supported"


def test_fake_reaches_child_processes(fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[L4, T4], driver="575.1.2", cuda_driver=12090)
    code = (
        "from pytest_unsloth import gpu; s = gpu.read_snapshot();"
        "print(s.driver_version, s.cuda_driver_version_str, [d.name for d in s.visible])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "575.1.2 12.9 ['NVIDIA L4', 'Tesla T4']"


# ----------------------------------------------------------------------------------------------
# Snapshot contents


def test_snapshot_fields(fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[L4, T4], driver="580.159.04", cuda_driver=13000)
    snap = gpu.read_snapshot(environ={})
    assert snap.available
    assert snap.error is None
    assert snap.driver_version == "580.159.04"
    assert snap.cuda_driver_version == 13000
    assert snap.cuda_driver_version_str == "13.0"
    assert snap.cuda_visible_devices is None
    l4, t4 = snap.devices
    assert l4.label == "cuda:0 (NVIDIA L4)"
    assert l4.capability == (8, 9)
    assert l4.bf16
    assert not t4.bf16
    assert l4.total_bytes == int(22.5 * GIB)
    assert l4.free_bytes == int(14.7 * GIB)
    assert l4.used_bytes == l4.total_bytes - l4.free_bytes
    assert not l4.is_mig
    assert l4.uuid.startswith("GPU-")
    assert l4.processes == ()
    assert gpu.format_gib(l4.free_bytes) == "14.7 GiB"
    assert gpu.format_gib(l4.total_bytes) == "22.5 GiB"
    assert [d.cuda_index for d in snap.visible] == [0, 1]


def test_processes_named_from_proc(fake_nvml: Callable[..., Any]) -> None:
    me = os.getpid()
    gone = 2**22 + 17  # above the default pid_max: no such process
    spec = dict(L4, processes=[{"pid": me, "used_gib": 3.0}, {"pid": gone, "used_bytes": None}])
    fake_nvml(gpus=[spec])
    (dev,) = gpu.read_snapshot(with_processes=True).devices
    mine, other = dev.processes
    assert mine.pid == me
    assert mine.used_bytes == 3 * GIB
    assert "python" in mine.name or "pytest" in mine.name
    assert other == gpu.GpuProcess(pid=gone, used_bytes=None, name="")
    assert gpu.read_snapshot().devices[0].processes == ()


def test_processes_refused_is_not_an_error(fake_nvml: Callable[..., Any]) -> None:
    spec = dict(L4, errors={"nvmlDeviceGetComputeRunningProcesses": "NoPermission"})
    fake_nvml(gpus=[spec])
    snap = gpu.read_snapshot(with_processes=True)
    assert snap.available
    assert snap.devices[0].processes == ()


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"no_driver": True}, "NVML Shared Library Not Found"),
        ({"init_error": "DriverNotLoaded"}, "Driver Not Loaded"),
        ({"init_error": "LibRmVersionMismatch"}, "RM has detected an NVML/RM version mismatch."),
        ({"gpus": [dict(L4, errors={"nvmlDeviceGetMemoryInfo": "GpuIsLost"})]}, "GPU is lost"),
    ],
)
def test_nvml_errors_become_unavailable(
    fake_nvml: Callable[..., Any], spec: dict[str, Any], error: str
) -> None:
    fake_nvml(**spec)
    snap = gpu.read_snapshot()
    assert not snap.available
    assert snap.error == error
    import pynvml

    assert pynvml._refcount == 0  # shut down even after a mid-read failure


def test_driver_without_gpus(fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[], driver="580.159.04")
    snap = gpu.read_snapshot()
    assert snap.available
    assert snap.devices == ()
    assert snap.visible == ()


def test_read_snapshot_is_never_cached(fake_nvml: Callable[..., Any]) -> None:
    handle = fake_nvml(gpus=[L4])
    assert gpu.read_snapshot().devices[0].free_bytes == int(14.7 * GIB)
    handle.update_gpu(0, free_gib=2.0)
    assert gpu.read_snapshot().devices[0].free_bytes == 2 * GIB
    assert handle.calls["nvmlInit"] == handle.calls["nvmlShutdown"] == 2


def test_mig_inventory(fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(gpus=[a100_mig(0, n=3)])
    snap = gpu.read_snapshot(environ={})
    (parent,) = snap.devices
    assert parent.mig_enabled
    assert not parent.is_mig
    assert parent.cuda_index is None
    assert parent.label == "nvml:0 (NVIDIA A100-SXM4-80GB)"
    assert len(snap.mig_instances) == 3
    assert all(m.is_mig and m.parent_uuid == parent.uuid for m in snap.mig_instances)
    assert [m.mig_slot for m in snap.mig_instances] == [0, 1, 2]
    # CUDA 11/12 enumerate a single MIG instance per process: the first one.
    (only,) = snap.visible
    assert only.uuid == snap.mig_instances[0].uuid
    assert only.label == "cuda:0 (NVIDIA A100-SXM4-80GB MIG 3g.40gb)"
    assert only.capability == (8, 0)  # inherited from the parent
    assert snap.mig_instances[1].label == "nvml:0/mig:1 (NVIDIA A100-SXM4-80GB MIG 3g.40gb)"


def test_mig_gpu_with_no_instances_and_mig_capable_gpu(fake_nvml: Callable[..., Any]) -> None:
    empty = dict(a100_mig(0), mig=[])
    capable = dict(h100(1), mig_capable=True)
    fake_nvml(gpus=[empty, capable])
    snap = gpu.read_snapshot(environ={})
    assert snap.devices[0].mig_enabled
    assert not snap.devices[1].mig_enabled
    assert [d.name for d in snap.visible] == ["NVIDIA H100 80GB HBM3"]
    assert snap.visible[0].nvml_index == 1
    assert snap.visible[0].cuda_index == 0


# ----------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", ()),
        ("-1", ()),
        ("0", (0,)),
        ("1,0", (1, 0)),
        (" 2 , 3 ", (2, 3)),
        ("0,2,x,3", (0, 2)),
        ("0,-1,1", (0,)),
        ("1gpu2", (1,)),
        ("+1", (1,)),
        ("0,0", ()),
        ("0,1,0", ()),
        ("x", ()),
        (",0", ()),
        ("0,", (0,)),
        ("GPU-abc", ("GPU-abc",)),
        ("GPU-abc,GPU-def", ("GPU-abc", "GPU-def")),
        ("GPU-abc,1", ("GPU-abc",)),
        ("0,GPU-abc", (0,)),
        ("MIG-abc,MIG-def", ("MIG-abc", "MIG-def")),
        ("MIG-abc,GPU-def", ("MIG-abc",)),
        ("GPU-abc,GPU-abc", ()),
        ("gpu-abc", ()),
    ],
)
def test_parse_cuda_visible_devices(
    value: str | None, expected: tuple[int | str, ...] | None
) -> None:
    assert gpu.parse_cuda_visible_devices(value) == expected


FOUR = [h100(0), h100(1, free=3.0), h100(2), h100(3)]


@pytest.mark.parametrize(
    ("cvd", "physical"),
    [
        (None, [0, 1, 2, 3]),
        ("", []),
        ("-1", []),
        ("2", [2]),
        ("3,1", [3, 1]),
        ("1,7,2", [1]),  # out of range stops
        ("0,0", []),  # repeated entry: nothing visible
        ("GPU-2aaa", [2]),  # unique uuid prefix
        ("GPU-3aaa3bbb-1111-2222-3333-444455556663,GPU-0aaa", [3, 0]),
        ("GPU-", []),  # ambiguous prefix stops at once
        ("GPU-1aaa,GPU-", [1]),
        ("GPU-ffff,GPU-1aaa", []),  # unknown uuid stops
        ("GPU-1aaa,GPU-1aaa1bbb", []),  # same GPU twice
        ("MIG-0000", []),  # no MIG instance with that id
    ],
)
def test_visible_mapping(
    fake_nvml: Callable[..., Any], cvd: str | None, physical: list[int]
) -> None:
    fake_nvml(gpus=FOUR)
    environ = {} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}
    snap = gpu.read_snapshot(environ=environ)
    assert snap.cuda_visible_devices == cvd
    assert [d.nvml_index for d in snap.visible] == physical
    assert [d.cuda_index for d in snap.visible] == list(range(len(physical)))
    cuda_of = {d.nvml_index: d.cuda_index for d in snap.devices}
    for cuda_index, nvml_index in enumerate(physical):
        assert cuda_of[nvml_index] == cuda_index
    hidden = [d for d in snap.devices if d.nvml_index not in physical]
    assert all(d.cuda_index is None and d.label.startswith("nvml:") for d in hidden)


def test_visible_mapping_reads_os_environ(
    fake_nvml: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpus=FOUR)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    (dev,) = gpu.read_snapshot().visible
    assert dev.label == "cuda:0 (NVIDIA H100 80GB HBM3)"
    assert dev.nvml_index == 1
    assert gpu.format_gib(dev.free_bytes) == "3.0 GiB"


@pytest.mark.parametrize(
    ("cvd", "uuids"),
    [
        (None, ["GPU-h0", "MIG-00"]),
        ("MIG-01", ["MIG-01"]),
        ("MIG-01,MIG-00", ["MIG-01"]),  # one MIG instance per process
        ("MIG-11c0ffee-0000-0000-0000-000000000000", ["MIG-11"]),
        ("1", ["MIG-00"]),  # ordinals index CUDA's own enumeration
        ("2", []),  # the other instances are not enumerated at all
        ("GPU-a1001", ["MIG-10"]),  # a MIG-mode GPU's uuid stands for its instances
        ("MIG-", []),  # ambiguous
        ("MIG-99", []),
    ],
)
def test_visible_mapping_with_mig(
    fake_nvml: Callable[..., Any], cvd: str | None, uuids: list[str]
) -> None:
    plain = dict(h100(0), uuid="GPU-h0")
    fake_nvml(gpus=[plain, a100_mig(0), a100_mig(1)])
    environ = {} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}
    snap = gpu.read_snapshot(environ=environ)
    assert [d.uuid[: len(u)] for d, u in zip(snap.visible, uuids, strict=False)] == uuids
    assert len(snap.visible) == len(uuids)
    for dev in snap.visible:
        assert dev.is_mig == dev.uuid.startswith("MIG-")


def test_cuda_version_str() -> None:
    assert gpu.cuda_version_str(13000) == "13.0"
    assert gpu.cuda_version_str(12040) == "12.4"
    assert gpu.cuda_version_str(12090) == "12.9"
    assert gpu.cuda_version_str(None) is None


# ----------------------------------------------------------------------------------------------
# Session inventory (what markers use)


def test_inventory_enumerates_once_and_rereads_memory(fake_nvml: Callable[..., Any]) -> None:
    handle = fake_nvml(gpus=[L4, T4])
    inv = gpu.GpuInventory()
    try:
        first = inv.snapshot(environ={})
        l4_uuid = first.visible[0].uuid
        for _ in range(50):
            inv.snapshot(memory_of=[l4_uuid], environ={})
        handle.update_gpu(0, free_gib=1.5)
        later = inv.snapshot(memory_of=[l4_uuid], environ={})
        assert later.visible[0].free_bytes == int(1.5 * GIB)
        assert later.devices[0].free_bytes == int(1.5 * GIB)
        assert later.visible[1].free_bytes == int(14.5 * GIB)  # not asked: enumeration value
        assert handle.calls["nvmlInit"] == 1
        assert handle.calls["nvmlDeviceGetCount"] == 1
        assert handle.calls["nvmlDeviceGetMemoryInfo"] == 2 + 51
        only_t4 = inv.snapshot(environ={"CUDA_VISIBLE_DEVICES": "1"})
        assert [d.name for d in only_t4.visible] == ["Tesla T4"]
        assert only_t4.visible[0].cuda_index == 0
    finally:
        inv.close()
    import pynvml

    assert pynvml._refcount == 0


def test_inventory_gpu_lost_later(fake_nvml: Callable[..., Any]) -> None:
    handle = fake_nvml(gpus=[L4])
    inv = gpu.GpuInventory()
    try:
        uuid = inv.snapshot().devices[0].uuid
        handle.update_gpu(0, errors={"nvmlDeviceGetMemoryInfo": "GpuIsLost"})
        snap = inv.snapshot(memory_of=[uuid])
        assert not snap.available
        assert snap.error == "GPU is lost"
    finally:
        inv.close()


def test_inventory_without_driver(fake_nvml: Callable[..., Any]) -> None:
    fake_nvml(no_driver=True)
    inv = gpu.GpuInventory()
    snap = inv.snapshot(memory_of=["GPU-x"], environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert not snap.available
    assert snap.error == "NVML Shared Library Not Found"
    assert snap.cuda_visible_devices == "0"
    inv.close()


# ----------------------------------------------------------------------------------------------
# GPU machine


@pytest.mark.gpu
def test_real_snapshot_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    snap = gpu.read_snapshot(with_processes=True)
    assert snap.available, snap.error
    assert snap.driver_version
    assert snap.cuda_driver_version is not None
    assert snap.cuda_driver_version >= 11000
    assert len(snap.visible) == torch.cuda.device_count()
    for dev in snap.visible:
        assert dev.cuda_index is not None
        props = torch.cuda.get_device_properties(dev.cuda_index)
        assert dev.name == props.name
        assert dev.capability == (props.major, props.minor)
        assert abs(dev.total_bytes - props.total_memory) < GIB
        assert str(props.uuid) in dev.uuid
