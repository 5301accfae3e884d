#!/usr/bin/env bash
# After the issue-12 layout change: the same GPU half as before, on the new package layout.
# 1) `pytest --unsloth-env` in an empty project, fresh then cached (as a user runs it);
# 2) every GPU-marked test of the suite, with the fatbin reader's comparison (gpu-archs.sh)
#    running beside it. Logs under $OUT, packed into one archive (a call returns few files).
# Run from the repository root with .whl (the wheelhouse) and .gpu (this repo's wheel) carried.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
source scripts/gpu-env.sh
{ date -u; nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv; } > "$OUT/machine.txt" 2>&1
proj=$(mktemp -d)
for i in 1 2; do
  s=$EPOCHREALTIME
  (cd "$proj" && timeout -k 5 150 python3 -m pytest --unsloth-env -rs \
     --unsloth-report="$OUT/env-run$i.json" > "$OUT/env-run$i.log" 2>&1)
  rc=$?
  python3 -c "print(f'rc=$rc wall: {$EPOCHREALTIME - $s:.2f} s')" >> "$OUT/env-run$i.log"
done
(mkdir -p "$OUT/archs" && OUT=$OUT/archs timeout -k 5 200 bash scripts/gpu-archs.sh > "$OUT/archs-run.log" 2>&1) &
archs=$!
UNSLOTH_TEST_GPU=1 timeout -k 5 "${TESTS_LIMIT:-400}" python3 -m pytest -p no:randomly \
  -p no:cacheprovider -rA --durations=15 -o faulthandler_timeout=380 -m gpu tests > "$OUT/gpu-tests.log" 2>&1
echo "gpu-tests rc=$?" >> "$OUT/gpu-tests.log"
wait $archs
(cd "$OUT" && tar czf "$SITE/logs.tgz" . && find . -mindepth 1 -delete && mv "$SITE/logs.tgz" "$OUT/logs.tgz")
exit 0
