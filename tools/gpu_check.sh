#!/usr/bin/env bash
# The GPU checks, as one command (at most ~8 minutes on one H100/H200). Run from the repository root:
#     bash tools/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT (device tool) or gpu_check/
# A dry run of the same steps on a CPU, small (checks the script, not the figures):
#     DEVICE=cpu MEMORY_N=500,2000 THROUGHPUT_N=512 BUDGET_N=2000 CASCADE_N=500 bash tools/gpu_check.sh /tmp/gpu_dry
# Writes OUT_DIR/gpu_check.json (one entry per step, with its exit status and seconds) and each step's
# own JSON and log beside it. Steps never stop each other: a failed step is recorded and the next runs.
#   1. the CUDA tests (pytest -m cuda)
#   2. ips bench memory --device cuda, 1k .. 250k patches
#   3. ips bench throughput --device cuda
#   4. the budget planner at the paper's setting: B 16, a 250k-patch slide, 5 GB (benchmarks/budget.py)
#   5. ips bench cascade --device cuda: the full selection pass vs the cascade (slides per hour on the GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check}}"
mkdir -p "$OUT_DIR"
# the project's venv where there is one; else the machine's python3 with this checkout on the path (a lent
# device machine has no network: packages it lacks travel as wheels, see the device tool's README)
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
DEVICE="${DEVICE:-cuda}"
MEMORY_N="${MEMORY_N:-1000,10000,100000,250000}"
STEPS="$OUT_DIR/steps.jsonl"
: > "$STEPS"

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  echo "$name: rc $rc ($(tail -1 "$OUT_DIR/$name.log"))"
}

$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" > "$OUT_DIR/device.txt" 2>&1
[ "$DEVICE" = cuda ] && step cuda_tests 120 $PY -m pytest -q -m cuda -p no:cacheprovider
step bench_memory 200 $PY -m ips.cli bench memory --device "$DEVICE" --n "$MEMORY_N" --no-naive \
  --threads 4 --read-threads 4 --json "$OUT_DIR/bench_memory.json" --plot "$OUT_DIR/memory_cuda.png" \
  --store-dir "$OUT_DIR/stores"
step bench_throughput 90 $PY -m ips.cli bench throughput --device "$DEVICE" --n "${THROUGHPUT_N:-8192}" --threads 4 --read-threads 4 \
  --json "$OUT_DIR/bench_throughput.json"
step budget 120 $PY benchmarks/budget.py --device "$DEVICE" --n "${BUDGET_N:-250000}" --store-dir "$OUT_DIR/stores" \
  --json "$OUT_DIR/budget.json"
step bench_cascade 150 $PY -m ips.cli bench cascade --device "$DEVICE" --n "${CASCADE_N:-10000}" --threads 4 \
  --read-threads 4 --store-dir "$OUT_DIR/stores" --json "$OUT_DIR/bench_cascade.json"

$PY - "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"device": (out / "device.txt").read_text().strip(),
           "steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line]}
for name in ("bench_memory", "bench_throughput", "budget", "bench_cascade"):
    f = out / f"{name}.json"
    if f.is_file():
        summary[name] = json.loads(f.read_text())
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(f"-> {out / 'gpu_check.json'}")
PYEOF
rm -rf "$OUT_DIR/stores"  # generated, large: not worth carrying back
