#!/usr/bin/env bash
# Third-session call on 2x H200 (issue 15), after the refit to the expandable-segments grid:
# GPU 0: the held-out points (fit_grid.HELD_OUT), measured under expandable segments like the
#        grid; their estimates were written down before (heldout-predictions-before-measuring.txt);
#        beside them the GPU-marked tests of tests/test_fit.py;
# GPU 1: the GRPO points whose default-allocator peak was far above the expandable one, re-run
#        with the DEFAULT allocator and torch's reservable memory capped at the estimate minus
#        its context part ($CAPS, INDEX@GIB): does the step complete inside its estimate?
# Run from the repository root with .whl (the wheelhouse) and .gpu (this repo's wheel) carried.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
source scripts/gpu-env.sh
{ date -u; nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv; } > "$OUT/machine.txt" 2>&1
CUDA_VISIBLE_DEVICES=0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FIT_CKPT=$(mktemp -d) \
  python3 benchmarks/fit_grid.py --out "$OUT/heldout.jsonl" --log "$OUT/heldout.log" \
  --only "${HELD:-40,44,41,42,43,45,46,47}" --jobs 8 --gib 105 --deadline 200 --timeout 420 > /dev/null 2>&1 &
h=$!
env -u PYTORCH_CUDA_ALLOC_CONF CUDA_VISIBLE_DEVICES=1 python3 benchmarks/fit_grid.py \
  --out "$OUT/capped-default.jsonl" --log "$OUT/capped-default.log" --only "${CAPS:?set CAPS}" \
  --jobs 6 --gib 132 --deadline 300 --timeout 420 > /dev/null 2>&1 &
c=$!
CUDA_VISIBLE_DEVICES=0 UNSLOTH_TEST_GPU=1 timeout -k 5 "${TESTS_LIMIT:-300}" python3 -m pytest -p no:randomly \
  -p no:cacheprovider -rA --durations=5 -o faulthandler_timeout=290 -m gpu tests/test_fit.py \
  > "$OUT/gpu-test-fit.log" 2>&1
echo "rc=$?" >> "$OUT/gpu-test-fit.log"
wait $h $c
exit 0
