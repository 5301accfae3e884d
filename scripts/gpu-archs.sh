#!/usr/bin/env bash
# Issue 14 on the GPU machine: the fatbin reader (pytest_unsloth.compat.archs) against torch's own arch
# list, NVIDIA's cuobjdump and the real libraries there (torch, its nvidia-* libraries,
# bitsandbytes, triton), then the arch check with and without target architectures. Writes
# everything under $OUT (archs.log plus JSON). Run from the repository root:
#   OUT=$OUT bash scripts/gpu-archs.sh
# Put nvidia_cuda_cuobjdump-*.whl into .whl/ to get the cuobjdump comparison (no network there).
set -uo pipefail
export OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
export SITE=${SITE:-$(mktemp -d)}
REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl .gpu/*.whl >/dev/null 2>&1 || true
# The checkout's code first, so this branch's reader runs even over an older wheel.
export PYTHONPATH=$REPO/src:$SITE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
  echo "== torch's view"
  python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_arch_list(), [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())])"
  echo "== reader: every library of torch, bitsandbytes, triton and the nvidia-* packages"
  NV=$(python3 -c "import importlib.metadata as m; print(' '.join(sorted({d.metadata['Name'] for d in m.distributions() if (d.metadata['Name'] or '').startswith('nvidia-')})))")
  python3 -m pytest_unsloth.archs --json torch bitsandbytes triton $NV > "$OUT/archs.json"
  python3 -m pytest_unsloth.archs torch bitsandbytes triton $NV
  echo "== reader vs torch.cuda.get_arch_list() and the visible GPUs"
  python3 - <<'PY'
import torch
from pytest_unsloth.compat import archs
libs = [archs.read_library(p) for p in archs.distribution_libraries("torch")]
cuda = [l for l in libs if l.has_cuda]
torch_cuda = next((l for l in cuda if "libtorch_cuda" in l.path), None)
listed = set(torch.cuda.get_arch_list())
print("libtorch_cuda:", torch_cuda)
if torch_cuda:
    print("sm in arch list, missing from libtorch_cuda:", sorted({a for a in listed if a.startswith("sm_")} - set(torch_cuda.sm)))
    print("sm in libtorch_cuda, not in arch list:", sorted(set(torch_cuda.sm) - listed))
for i in range(torch.cuda.device_count()):
    cap = torch.cuda.get_device_capability(i)
    for l in cuda:
        print(f"cuda:{i} sm_{cap[0]}{cap[1]}: {l.path.rsplit('/', 1)[-1]}: {l.how(cap)}")
PY
  echo "== cuobjdump comparison (every CUDA library read above)"
  CO=$(command -v cuobjdump || ls "$SITE"/nvidia/cu*/bin/cuobjdump 2>/dev/null | head -1)
  if [ -n "$CO" ]; then
    python3 - "$CO" <<'PY'
import json, os, re, subprocess, sys
co = sys.argv[1]
rows = json.load(open(os.environ["OUT"] + "/archs.json"))
bad = 0
for r in rows:
    sets = []
    for flag, pre, ext in (("--list-elf", "sm_", "cubin"), ("--list-ptx", "compute_", "ptx")):
        out = subprocess.run([co, flag, r["path"]], capture_output=True, text=True).stdout
        sets.append({pre + m for m in re.findall(rf"\.sm_(\d+[af]?)\.{ext}$", out, re.M)})
    # cuobjdump --list-elf names a family-specific cubin sm_100 where -elf says sm_100f (as the
    # reader does); --list-ptx keeps the f. Compare cubins with the f dropped.
    ours_sm = {s[:-1] if s.endswith("f") else s for s in r["sm"]}
    ok = sets == [ours_sm, set(r["ptx"])]
    bad += not ok
    print("agree" if ok else f"DIFFER cuobjdump={sets}", r["path"])
print(f"{len(rows) - bad}/{len(rows)} libraries agree with cuobjdump")
PY
  else
    echo "cuobjdump not available: put nvidia_cuda_cuobjdump-*.whl into .whl/"
  fi
  echo "== reading speed"
  python3 benchmarks/bench_archs.py --json "$OUT/bench-archs.json" torch bitsandbytes triton $NV
  echo "== arch check: visible GPU, then targets sm_90 sm_100 sm_120 as a CPU CI job would ask"
  cd "$(mktemp -d)"
  python3 -m pytest --unsloth-env --unsloth-checks=arch -rA -p no:cacheprovider
  python3 -m pytest --unsloth-env --unsloth-checks=arch -rA -p no:cacheprovider --unsloth-target-arch=sm_90,sm_100,sm_120
  CUDA_VISIBLE_DEVICES= python3 -m pytest --unsloth-env --unsloth-checks=arch -rA -p no:cacheprovider --unsloth-target-arch=sm_120
  cd "$REPO"
  echo "== GPU-marked tests of this issue"
  UNSLOTH_TEST_GPU=1 python3 -m pytest -m gpu tests/test_archs.py tests/test_arch_check.py -rs -v -p no:cacheprovider
} 2>&1 | tee "$OUT/archs.log"
exit 0
