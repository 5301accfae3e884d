"""The topology check against the fake NVML's topology, P2P, NvLink, mode, ECC and clock answers."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuspecs import fake_gpu
from pytest_unsloth.checks import topology
from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.settings import Settings


def h200(i: int, **extra: Any) -> dict[str, Any]:
    uuid = f"GPU-{i}0000000-1111-2222-3333-44445555666{i}"
    return fake_gpu("H200", uuid=uuid, free_gib=139.0, **{"nvlinks": 18, **extra})


NVLINKED = {
    "0,1": {"level": 50, "p2p": {"read": 0, "write": 0, "nvlink": 0, "atomics": 0}},
}


def ctx(tmp_path: Path) -> CheckContext:
    return CheckContext(Settings(), tmp_path)


def test_two_nvlinked_gpus_pass_with_the_layout(
    fake_nvml: Callable[..., Any], tmp_path: Path
) -> None:
    fake_nvml(gpus=[h200(0), h200(1)], links=NVLINKED)
    detail = topology.check_topology(ctx(tmp_path))
    assert detail.startswith("cuda:0<->cuda:1 NVLink via SYS (P2P read ok, write ok)")
    assert "cuda:0: compute Default, persistence on, 18 NVLinks active" in detail


def test_p2p_read_is_queried_despite_the_tuple_constant(
    fake_nvml: Callable[..., Any], tmp_path: Path
) -> None:
    fake = fake_nvml(gpus=[h200(0), h200(1)], links=NVLINKED)
    nv = sys.modules["pynvml"]
    assert nv.NVML_P2P_CAPS_INDEX_READ == (0,)  # what nvidia-ml-py really defines
    topology.check_topology(ctx(tmp_path))
    # two directions x (read, write, nvlink once): every query reached the fake
    assert fake.calls["nvmlDeviceGetP2PStatus"] == 5


def test_pcie_pair_without_p2p_passes_with_advice(
    fake_nvml: Callable[..., Any], tmp_path: Path
) -> None:
    pcie = {k: v for k, v in h200(0).items() if k != "nvlinks"}
    fake_nvml(gpus=[pcie, dict(pcie, uuid="GPU-other")], links={"0,1": {"level": 30}})
    detail = topology.check_topology(ctx(tmp_path))
    assert "cuda:0<->cuda:1 PHB (P2P read not supported, write not supported)" in detail
    assert "prefer DDP" in detail and "NCCL stages transfers through host memory" in detail


def test_one_way_p2p_fails(fake_nvml: Callable[..., Any], tmp_path: Path) -> None:
    links = {
        "0,1": {"level": 20, "p2p": {"read": 0, "write": 0}},
        "1,0": {"level": 20, "p2p": {"read": 3, "write": 0}},
    }
    fake_nvml(gpus=[h200(0), h200(1)], links=links)
    with pytest.raises(CheckFailed) as exc:
        topology.check_topology(ctx(tmp_path))
    assert "P2P reads are granted one way only (cuda:0->cuda:1 ok, cuda:1->cuda:0 IOH" in (
        exc.value.found
    )
    assert "NCCL_P2P_DISABLE=1" in exc.value.fix


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"compute_mode": 2}, "compute mode Prohibited: no process can use it"),
        (
            {"compute_mode": 3, "processes": [{"pid": 4242, "used_gib": 1.0}]},
            "compute mode Exclusive Process and already held by pid 4242",
        ),
        ({"retired_pending": True}, "ECC page retirement pending until the GPU is reset"),
        ({"remapped_rows": [0, 1, 1, 0]}, "ECC row remapping pending"),
        ({"remapped_rows": [0, 1, 0, 1]}, "failed to remap a memory row"),
        ({"ecc_volatile_uncorrected": 3}, "reports 3 uncorrected ECC error(s)"),
        ({"throttle": 0x40 | 0x20}, "held down right now: software thermal slowdown, hardware"),
        ({"throttle": 0x80}, "hardware power brake"),
    ],
)
def test_gpu_states_that_fail(
    fake_nvml: Callable[..., Any], tmp_path: Path, extra: dict[str, Any], expected: str
) -> None:
    fake_nvml(gpus=[h200(0, **extra)])
    with pytest.raises(CheckFailed) as exc:
        topology.check_topology(ctx(tmp_path))
    assert expected in exc.value.found
    assert exc.value.found.startswith("cuda:0 (NVIDIA H200)")


def test_states_that_only_inform(fake_nvml: Callable[..., Any], tmp_path: Path) -> None:
    # Exclusive Process with nobody on it, the power cap under load, persistence off: no failure.
    fake_nvml(gpus=[h200(0, compute_mode=3, throttle=0x4 | 0x1, persistence=False)])
    detail = topology.check_topology(ctx(tmp_path))
    assert detail.startswith("one GPU: cuda:0: compute Exclusive Process, persistence off")
    assert "clocks at the power cap" in detail


def test_refused_queries_degrade_fields_not_the_check(
    fake_nvml: Callable[..., Any], tmp_path: Path
) -> None:
    refuse = {
        name: "NotSupported"
        for name in (
            "nvmlDeviceGetPersistenceMode",
            "nvmlDeviceGetComputeMode",
            "nvmlDeviceGetTopologyCommonAncestor",
            "nvmlDeviceGetP2PStatus",
            "nvmlDeviceGetNvLinkState",
            "nvmlDeviceGetCurrentClocksEventReasons",
            "nvmlDeviceGetTotalEccErrors",
        )
    }
    fake_nvml(gpus=[h200(0, errors=refuse), h200(1, errors=refuse)])
    assert topology.check_topology(ctx(tmp_path)) == "cuda:0<->cuda:1 ? (P2P read ?, write ?)"


def test_mig_layout_reported_on_the_parent(fake_nvml: Callable[..., Any], tmp_path: Path) -> None:
    gpu = h200(0, mig=[{"name": "NVIDIA H200 MIG 1g.18gb", "total_gib": 16.0, "free_gib": 16.0}])
    fake_nvml(gpus=[gpu])
    assert "MIG on (1g.18gb)" in topology.check_topology(ctx(tmp_path))


def test_cuda_visible_devices_limits_the_pairs(
    fake_nvml: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpus=[h200(0), h200(1), h200(2)], links=NVLINKED)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    detail = topology.check_topology(ctx(tmp_path))
    assert detail.startswith("cuda:0<->cuda:1 SYS")  # physical 2 and 0: no link entry
    assert detail.count("<->") == 1


def test_skips_without_gpu(fake_nvml: Callable[..., Any], tmp_path: Path) -> None:
    fake_nvml(no_driver=True)
    with pytest.raises(CheckSkipped, match="no NVIDIA GPU: NVML says NVML Shared Library"):
        topology.check_topology(ctx(tmp_path))


def test_new_fake_constants_match_the_real_module(
    fake_nvml: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpus=[h200(0)])
    fake = sys.modules["pynvml"]
    real_file = next(
        Path(p) / "pynvml.py"
        for p in sys.path
        if (Path(p) / "pynvml.py").is_file() and "fakes" not in p
    )
    spec = importlib.util.spec_from_file_location("real_pynvml_for_test", real_file)
    assert spec is not None and spec.loader is not None
    real = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "real_pynvml_for_test", real)  # it looks itself up there
    spec.loader.exec_module(real)
    names = [
        n
        for n in dir(fake)
        if n.startswith(("NVML_P2P", "NVML_TOPOLOGY", "NVML_COMPUTEMODE", "nvmlClocksEventReason"))
    ]
    assert len(names) > 20
    for name in [*names, "NVML_NVLINK_MAX_LINKS", "NVML_VOLATILE_ECC"]:
        assert getattr(fake, name) == getattr(real, name), name


def test_an_item_in_a_pytest_run(fake_nvml: Callable[..., Any], pytester: pytest.Pytester) -> None:
    fake_nvml(gpus=[h200(0, compute_mode=2)])
    result = pytester.runpytest("--unsloth-env", "--unsloth-checks", "topology")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["found: cuda:0 (NVIDIA H200) is in compute mode Prohibited*", "why: *", "fix:   nvidia*"]
    )


@pytest.mark.gpu
def test_real_nvml_layout(tmp_path: Path) -> None:
    from pytest_unsloth.gpu import read_snapshot

    if len(read_snapshot().visible) < 2:
        pytest.skip("needs two visible GPUs")
    detail = topology.check_topology(ctx(tmp_path))
    assert detail.startswith("cuda:0<->cuda:1 ")
    assert "P2P read ?" not in detail  # the tuple constant must not break real read queries
    print(detail)
