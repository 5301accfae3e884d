#!/usr/bin/env bash
# One batched session on a lent GPU machine, run from the repository root. Installs the plugin
# as a user would (our wheel from .gpu/ plus the carried wheelhouse .whl/), then runs the steps
# named in $STEPS (default: all) and leaves logs under $OUT (required). Scratch files (the
# install target $SITE, the user project) go to fresh temporary folders.
#   env:      pytest --unsloth-env twice (fresh probes, then the probe cache) + JSON reports
#   bench:    benchmarks/bench_startup.py and benchmarks/bench_probes.py
#   tests:    the GPU-marked tests (UNSLOTH_TEST_GPU=1 pytest -m gpu)
#   examples: the examples/ projects
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
STEPS=${STEPS:-"env bench tests examples"}
export SITE=${SITE:-$(mktemp -d)}
PROJ=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl .gpu/*.whl || exit 1
export PYTHONPATH=$SITE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
REPO=$PWD
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  python3 - <<'PY'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for n in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
          "triton", "unsloth", "unsloth_zoo", "vllm", "xformers", "flash-attn", "pytest",
          "pytest-unsloth"):
    try:
        print(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"{n} not installed")
PY
} 2>&1 | tee "$OUT/versions.txt"

step() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }

if step env; then
  cd "$PROJ"
  for i in 1 2; do
    s=$EPOCHREALTIME
    python3 -m pytest --unsloth-env -rs --unsloth-report="$OUT/env-run$i.json" 2>&1 | tee "$OUT/env-run$i.log"
    python3 -c "print(f'wall: {$EPOCHREALTIME - $s:.2f} s')" | tee -a "$OUT/env-run$i.log"
  done
  cd "$REPO"
fi
if step bench; then
  (cd "$PROJ"
   python3 "$REPO/benchmarks/bench_startup.py" --runs 5 --json "$OUT/bench-startup.json") 2>&1 | tee "$OUT/bench.log"
  python3 benchmarks/bench_probes.py --json "$OUT/bench-probes.json" 2>&1 | tee -a "$OUT/bench.log"
fi
if step tests; then
  UNSLOTH_TEST_GPU=1 python3 -m pytest -m gpu tests -rs -v -p no:cacheprovider -o faulthandler_timeout=400 \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
fi
if step examples && [ -x scripts/run-examples.sh ]; then
  bash scripts/run-examples.sh 2>&1 | tee "$OUT/examples.log"
fi
exit 0
