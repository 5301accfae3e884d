"""On a machine with two or more GPUs (the lent nvidia-h200-x2): xdist pinning, gpus, sums."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu


def _gpu_count() -> int:
    from pytest_unsloth.gpu import read_snapshot

    return len(read_snapshot().visible)


@pytest.fixture(autouse=True)
def _need_two_gpus() -> None:
    if _gpu_count() < 2:
        pytest.skip("needs two visible GPUs")


def test_each_xdist_worker_gets_its_own_gpu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    seen_dir = pytester.path / "seen"
    seen_dir.mkdir()
    monkeypatch.setenv("SEEN_DIR", str(seen_dir))
    pytester.makepyfile(
        test_pinned="""
        import json, os
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_where(gpu, i):
            import torch
            props = torch.cuda.get_device_properties(0)
            name = f"{os.environ['PYTEST_XDIST_WORKER']}-{i}.json"
            out = os.path.join(os.environ["SEEN_DIR"], name)
            open(out, "w").write(json.dumps({
                "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "torch_count": torch.cuda.device_count(),
                "torch_uuid": "GPU-" + str(props.uuid),
                "fixture_uuid": gpu.uuid,
                "cuda_index": gpu.cuda_index,
            }))
        """
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--unsloth-gpus-per-worker=1", "-p", "no:cacheprovider", timeout=300
    )
    result.assert_outcomes(passed=4)
    seen = [json.loads(p.read_text()) for p in seen_dir.glob("*.json")]
    assert len(seen) == 4, result.stdout.str()
    by_worker = {s["cvd"] for s in seen}
    assert len(by_worker) == 2, seen  # two workers, two different GPUs
    for s in seen:
        assert s["torch_count"] == 1
        assert s["cuda_index"] == 0
        assert s["torch_uuid"] == s["fixture_uuid"]


def test_gpus_fixture_and_summed_vram(pytester: pytest.Pytester):
    from pytest_unsloth.gpu import read_snapshot

    gpus = read_snapshot().visible
    single = max(g.free_bytes for g in gpus) / 2**30
    total = sum(g.free_bytes for g in gpus) / 2**30
    between = round((single + total) / 2, 1)
    pytester.makepyfile(
        test_sum=f"""
        import pytest

        def test_lists_all(gpus):
            assert len(gpus) == {len(gpus)}
            assert [g.cuda_index for g in gpus] == list(range({len(gpus)}))

        @pytest.mark.requires_gpu(2)
        @pytest.mark.requires_vram({between}, total_across=True)
        def test_sum_is_enough():
            pass

        @pytest.mark.requires_vram({between})
        def test_one_gpu_is_not_enough():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines([f"*needs {between:.1f} GiB free on cuda:0*"])


def test_env_checks_see_every_gpu_under_pinning(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path
):
    """Issue 17 on real GPUs: memory held only on the second GPU fails vram under pinning."""
    import subprocess
    import sys
    import time

    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, sys, time, torch\n"
            "x = torch.empty(100 * 2**30, dtype=torch.uint8, device='cuda:1')\n"
            "pathlib.Path(sys.argv[1]).write_text('ok')\n"
            "time.sleep(600)\n",
            str(ready),
        ]
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert holder.poll() is None, "the memory holder died"
            assert time.monotonic() < deadline, "the memory holder did not start"
            time.sleep(0.5)
        result = pytester.runpytest_subprocess(
            "--unsloth-env",
            "-p",
            "no:cacheprovider",
            "--unsloth-checks=cuda,arch,bf16,vram,bitsandbytes,triton",
            "--unsloth-min-free-vram=60",
            "--unsloth-report=report.json",
            "-n",
            "2",
            "--unsloth-gpus-per-worker=1",
            "-rA",
            timeout=400,
        )
        print(result.stdout.str())
        checks = {
            c["name"]: c for c in json.loads((pytester.path / "report.json").read_text())["checks"]
        }
        assert checks["vram"]["status"] == "failed"
        assert "cuda:1" in checks["vram"]["found"] and "cuda:0" not in checks["vram"]["found"]
        assert "2 GPU(s) usable" in checks["cuda"]["message"], checks["cuda"]
        assert checks["bf16"]["status"] == "passed"
        for name in ("bitsandbytes", "triton"):
            assert checks[name]["status"] == "passed", checks[name]
            assert "cuda:0, cuda:1" in checks[name]["message"], checks[name]
    finally:
        holder.kill()
        holder.wait()
