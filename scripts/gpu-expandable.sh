#!/usr/bin/env bash
# Third-session call on 2x H200 (issues 12 and 15), everything at once:
# 1) issue 15: every fit point (the 30 calibration points and the 10 held out until then) measured
#    again with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, so the reserved peak is what the
#    step needs rather than what the default allocator keeps cached after generate() outgrows
#    its blocks;
#    the points are split over the two GPUs (CUDA_VISIBLE_DEVICES; NVML follows it), longest first;
# 2) issue 12: the NCCL rank code and topology tests on two real GPUs, then the other GPU-marked
#    tests while time is left.
# Run from the repository root with .whl (the wheelhouse) and .gpu (this repo's wheel) carried.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
source scripts/gpu-env.sh
{ date -u; nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv; } > "$OUT/machine.txt" 2>&1
fit() {  # GPU INDICES
  CUDA_VISIBLE_DEVICES=$1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FIT_CKPT=$(mktemp -d) \
    python3 benchmarks/fit_grid.py --out "$OUT/expandable-gpu$1.jsonl" --log "$OUT/expandable-gpu$1.log" \
    --only "$2" --jobs "${FIT_JOBS:-6}" --gib 132 --deadline "${FIT_DEADLINE:-330}" --timeout 420 > /dev/null 2>&1
}
fit 0 "${FIT_GPU0:-27,32,26,29,2,0,1,3,4,5,25,30,37,38,6,7,8,9,10}" &
f0=$!
fit 1 "${FIT_GPU1:-31,34,33,39,28,24,35,36,11,12,13,14,15,16,17,18,19,20,21,22,23}" &
f1=$!
UNSLOTH_TEST_GPU=1 timeout -k 5 "${NCCL_LIMIT:-240}" python3 -m pytest -p no:randomly -p no:cacheprovider \
  -rA --durations=10 -o faulthandler_timeout=230 -m gpu tests/test_nccl.py tests/test_topology.py \
  > "$OUT/gpu-nccl-topology.log" 2>&1
echo "rc=$?" >> "$OUT/gpu-nccl-topology.log"
UNSLOTH_TEST_GPU=1 timeout -k 5 "${REST_LIMIT:-250}" python3 -m pytest -p no:randomly -p no:cacheprovider \
  -rA --durations=10 -o faulthandler_timeout=240 -m gpu tests --ignore tests/test_nccl.py \
  --ignore tests/test_topology.py > "$OUT/gpu-other.log" 2>&1
echo "rc=$?" >> "$OUT/gpu-other.log"
wait $f0 $f1
exit 0
