#!/usr/bin/env bash
# Third-session call on 2x H200 (issue 15): does a step complete with the DEFAULT allocator when
# torch may reserve its estimate plus 10 % (the fit check's close-call margin), context apart?
# $CAPS0 / $CAPS1 (INDEX@GIB,...) run on GPU 0 / GPU 1, each set under one scheduler; the
# GPU-marked tests of tests/test_fit.py run beside them on GPU 0.
# Run from the repository root with .whl (the wheelhouse) and .gpu (this repo's wheel) carried.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
source scripts/gpu-env.sh
{ date -u; nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv; } > "$OUT/machine.txt" 2>&1
pids=()
for gpu in 0 1; do
  caps=CAPS$gpu
  [ -n "${!caps:-}" ] || continue
  env -u PYTORCH_CUDA_ALLOC_CONF CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/fit_grid.py \
    --out "$OUT/margin-gpu$gpu.jsonl" --log "$OUT/margin-gpu$gpu.log" --only "${!caps}" \
    --jobs 6 --gib 105 --deadline 120 --timeout 420 > /dev/null 2>&1 &
  pids+=($!)
done
CUDA_VISIBLE_DEVICES=0 UNSLOTH_TEST_GPU=1 timeout -k 5 "${TESTS_LIMIT:-300}" python3 -m pytest -p no:randomly \
  -p no:cacheprovider -rA --durations=5 -o faulthandler_timeout=290 -m gpu tests/test_fit.py \
  > "$OUT/gpu-test-fit.log" 2>&1
echo "rc=$?" >> "$OUT/gpu-test-fit.log"
wait "${pids[@]}"
exit 0
