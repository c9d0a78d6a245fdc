#!/usr/bin/env bash
# One prepared GPU run: every measurement in its own process, at most 8 minutes in all on one
# H100/H200 with PyTorch, onnx and onnxruntime (CPU); no TensorRT, no CUDA ONNX Runtime, no network.
#
#   bash benchmarks/gpu.sh                # writes benchmarks/results/gpu-DATE/*.json and gpu-DATE.json
#   bash benchmarks/gpu.sh --dry-run      # the same steps on the CPU, tiny sizes, in seconds
#   bash benchmarks/gpu.sh --out DIR      # step files into DIR, merged into DIR.json
#
# A step that fails or runs past its time limit is recorded in the merged JSON ("steps") and the
# run goes on; the exit status is 1 when any step failed.
set -u -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
DRY=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run" ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "Error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
STAMP="$(date +%Y%m%d-%H%M%S)"
if [ -z "$OUT" ]; then
  OUT="$HERE/results/gpu-$STAMP${DRY:+-dry}"
fi
mkdir -p "$OUT"
WORK="${TMPDIR:-/tmp}/cavmae-gpu-bench${DRY:+-dry}"
STATUS="$OUT/.status"
: > "$STATUS"
export PYTHONUNBUFFERED=1
export CAVMAE_NO_PROGRESS=1
export CAVMAE_HOME="$WORK/home"   # nothing from the user's cache, nothing downloaded
FAILED=0

# step NAME LIMIT_SECONDS ARGS...: one process, killed at its limit (limits sum to 460 s)
step() {
  local name="$1" limit="$2"; shift 2
  [ -n "$DRY" ] && limit=300  # tiny sizes; generous for a loaded CI machine
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$PY" "$HERE/gpu_bench.py" "$@" --out "$OUT" --work "$WORK" $DRY
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then
    echo "$name ok ${took}s" >> "$STATUS"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "$name timeout after ${took}s (limit ${limit}s)" >> "$STATUS"; FAILED=1
  else
    echo "$name failed rc=$rc after ${took}s" >> "$STATUS"; FAILED=1
  fi
}

step prepare 40 prepare
step reference-fp32 60 reference --precision fp32
step reference-fp16 40 reference --precision fp16
step engine-fp16 120 engine --precision fp16
step engine-bf16 120 engine --precision bf16
step decode 30 decode
step train 50 train
"$PY" "$HERE/gpu_bench.py" merge --out "$OUT" --status "$STATUS" $DRY || FAILED=1
cat "$STATUS" >&2
exit $FAILED
