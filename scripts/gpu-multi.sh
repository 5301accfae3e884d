#!/usr/bin/env bash
# Issue 16 on the lent two-GPU machine (nvidia-h200-x2): the machine checks for real, and
# unsloth's own `doctor --gpus` side by side. Run from the repository root after:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target "$SITE" .whl/*.whl && export PYTHONPATH=$SITE:$PWD/src HF_HUB_OFFLINE=1 \
#     TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# Logs go to $OUT (required; one file per step, plus summary.txt with each step's wall time and exit
# status). Every step has its own `timeout`, so the whole script stays under 6 minutes.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}; mkdir -p "$OUT"
PROJ=$(mktemp -d)
REPO=$PWD
PLUG=(-p no:randomly)  # the plugin comes from the installed wheel (.gpu), as for users
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to $OUT/NAME.log, record wall + rc.
# The limit is cut to what is left of the script's 340 s budget; a step with < 15 s left is skipped.
END=$((SECONDS + 340))
step() {
  local name=$1 limit=$2; shift 2
  local left=$((END - SECONDS))
  if [ "$left" -lt 15 ]; then echo "$name skipped (budget spent)" | tee -a "$SUMMARY"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local s=$EPOCHREALTIME
  echo "=== $name: $*" | tee "$OUT/$name.log"
  timeout -k 5 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local wall; wall=$(python3 -c "print(f'{$EPOCHREALTIME - $s:.1f}')")
  echo "$name rc=$rc wall=${wall}s" | tee -a "$SUMMARY"
  tail -n 40 "$OUT/$name.log"
}

{
  date -u
  nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,memory.total,persistence_mode,compute_mode --format=csv
  nvidia-smi topo -m
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

cd "$PROJ" || exit 1
rm -rf .pytest_cache

# 1. The machine checks in a plain process that sees both GPUs: nccl passes (real all_reduce,
#    P2P copy, bandwidth), topology shows the layout, launcher fails (trl/transformers/unsloth
#    are installed and no launcher variables are set).
step checks 90 python3 -m pytest "${PLUG[@]}" --unsloth-env -rA \
  --unsloth-checks launcher,topology,nccl,shm,disk,compiler,platform \
  --unsloth-report="$OUT/checks.json"

# 2. requires_kernel("nccl") on a real test: runs (not skipped), reusing step 1's cached probe.
cat > test_ddp_marker.py <<'PY'
import pytest

@pytest.mark.requires_kernel("nccl")
def test_needs_nccl():
    pass
PY
step marker 40 python3 -m pytest "${PLUG[@]}" -rs -v test_ddp_marker.py
rm -f test_ddp_marker.py

# 3. NCCL made to fail: no usable socket interface, P2P and SHM transports off. Must fail within
#    its timeout (30 s per attempt; NCCL_P2P_DISABLE is already set, so only NCCL_IB_DISABLE=1 is
#    tried again) with the stage and NCCL's own message.
step nccl-broken 100 env NCCL_SOCKET_IFNAME=nonexistent0 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 \
  python3 -m pytest "${PLUG[@]}" --unsloth-env -rA --unsloth-checks nccl \
  --unsloth-nccl-timeout 30 --unsloth-report="$OUT/nccl-broken.json"

# 4. launcher under torchrun with two ranks: passes on both (and nccl is switched on by the
#    launcher setup, but deselected here to keep the step short).
step launcher-torchrun 60 python3 -m torch.distributed.run --nproc-per-node 2 -m pytest \
  "${PLUG[@]}" --unsloth-env -rA -p no:cacheprovider --unsloth-checks launcher,topology

# 5. The GPU-marked tests of the machine checks (real NVML, real NCCL through the rank runner).
cd "$REPO" || exit 1
step gpu-tests 90 env UNSLOTH_TEST_GPU=1 python3 -m pytest "${PLUG[@]}" -m gpu -rs -v \
  -p no:cacheprovider tests/test_nccl.py tests/test_topology.py tests/test_machine_checks.py
cd "$PROJ" || exit 1

# 6. Side by side: unsloth doctor --gpus (its console command cannot start here: the wheel
#    strips the web UI its CLI package imports), so its module is loaded from the file and its
#    own _gpu_checks() runs, with a stand-in for typer if typer is missing. Then the plugin's
#    equivalent (topology + nccl, fresh probes) on the same machine.
cat > "$PROJ/doctor_direct.py" <<'PY'
import importlib.util, os, sys, time, types
start = time.perf_counter()
try:
    import typer  # noqa: F401
except ImportError:  # only echo/Exit/Option/Context are used by the doctor module
    typer = types.ModuleType("typer")
    class Exit(Exception):
        def __init__(self, code=0):
            super().__init__(code)
            self.exit_code = code
    typer.Exit = Exit
    typer.echo = lambda msg="": print(msg, flush=True)
    typer.Option = lambda default=None, *a, **k: default
    typer.Context = object
    sys.modules["typer"] = typer
path = next(os.path.join(p, "unsloth_cli", "commands", "doctor.py") for p in sys.path
            if os.path.exists(os.path.join(p, "unsloth_cli", "commands", "doctor.py")))
spec = importlib.util.spec_from_file_location("unsloth_doctor", path)
doctor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(doctor)
timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
code = 0
try:
    doctor._gpu_checks(timeout)
except sys.modules["typer"].Exit as e:
    code = e.exit_code
print(f"doctor exit {code}; wall {time.perf_counter() - start:.1f} s ({path})", flush=True)
PY
step doctor 70 python3 "$PROJ/doctor_direct.py" 60
step plugin-equivalent 70 python3 -m pytest "${PLUG[@]}" --unsloth-env -rA -p no:cacheprovider \
  --unsloth-checks topology,nccl
step doctor-broken 60 env NCCL_SOCKET_IFNAME=nonexistent0 NCCL_P2P_DISABLE=1 \
  NCCL_SHM_DISABLE=1 python3 "$PROJ/doctor_direct.py" 20

echo "=== summary"; cat "$SUMMARY"
exit 0
