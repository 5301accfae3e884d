#!/usr/bin/env bash
# Second-session GPU call (issues 13 and 15) on one H200: the held-out fit points (long
# completions included) and issue 13's first-contact / README tests with a real GPU, side by side.
# Run from the repo root with the wheelhouse (.whl) and this repo's wheel (.gpu) carried.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
source scripts/gpu-env.sh
{ date -u; nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv; } > "$OUT/machine.txt" 2>&1
python3 benchmarks/fit_grid.py --out "$OUT/fit_heldout.jsonl" --log "$OUT/fit_heldout.log" \
  --only "${FIT_ONLY:-27,31,32,33,34,35,36,37,38,39}" --jobs 5 --gib 135 --deadline 120 --timeout 400 \
  > /dev/null 2>&1 &
fit=$!
UNSLOTH_TEST_GPU=1 timeout -k 5 ${FIRST_LIMIT:-420} python3 -m pytest -p no:randomly -p no:cacheprovider -rA \
  --durations=0 -o faulthandler_timeout=500 ${FIRST_TESTS:-tests/test_quiet.py tests/test_first_contact.py tests/test_readme.py} > "$OUT/first-contact.log" 2>&1
echo "first-contact rc=$?" >> "$OUT/first-contact.log"
wait $fit
echo "fit rc=$?" >> "$OUT/fit_heldout.log"
exit 0
