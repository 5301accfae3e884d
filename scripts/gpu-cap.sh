#!/usr/bin/env bash
# Does a step run inside its estimate? Grid points re-run with torch's reservable memory capped at
# the estimate minus its CUDA-context part (set_per_process_memory_fraction): a point that
# completes needs no more than the estimate, whatever its uncapped reserved peak was (the caching
# allocator frees cached blocks and retries before it raises OOM). One run per "INDEX@GIB" in
# $CAPS, all at once. Run from the repo root with .whl and .gpu carried.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
source scripts/gpu-env.sh
pids=()
for spec in ${CAPS:?set CAPS, e.g. "34@5.34 34@4.27"}; do
  idx=${spec%@*}; gib=${spec#*@}
  python3 benchmarks/fit_grid.py --out "$OUT/cap.jsonl" --log "$OUT/cap.log" --only "$idx" \
    --cap-gib "$gib" --jobs 1 --gib 135 --deadline 30 --timeout "${CAP_TIMEOUT:-400}" > /dev/null 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
exit 0
