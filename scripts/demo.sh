#!/usr/bin/env bash
# The main job: train a small model on the bundled digits, evaluate, profile, compress it,
# then serve the results over HTTP.
# Usage: scripts/demo.sh PYTHON   (make demo passes the venv's python)
# Runs from the repository root whatever the working directory; a relative PYTHON path or
# DEMO_OUT is taken from the directory the script was started in.
set -euo pipefail
CALLER_DIR=$PWD
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${1:-python3}
if [[ $PY == */* && $PY != /* ]]; then PY="$CALLER_DIR/$PY"; fi
OUT=${DEMO_OUT:-runs/demo}
if [[ -n ${DEMO_OUT:-} && $OUT != /* ]]; then OUT="$CALLER_DIR/$OUT"; fi
cd "$ROOT"
THREADS=${DEMO_THREADS:-2}
st() { "$PY" -m slimtorch.cli "$@"; }

echo "== 1. devices and profiles"
st devices
echo
echo "== 2. train lenet5 on the bundled 8x8 digits (CPU, $THREADS threads)"
st train --model lenet5 --dataset digits --epochs 30 --batch-size 64 --lr 0.05 \
  --device cpu --threads "$THREADS" --out "$OUT" --no-progress --overwrite
echo
echo "== 3. evaluate the saved model directory"
st eval --in "$OUT" --device cpu --threads "$THREADS"
echo
echo "== 4. profile it: measured here, estimated on each device profile"
st profile --in "$OUT" --batch-size 1 --device cpu --threads "$THREADS" --json "$OUT/profile.json"
echo
st profile --in "$OUT" --batch-size 256 --device cpu --threads "$THREADS"
echo
echo "== 5. compress: truncated SVD of every layer it handles (size first, no speed check), fine-tune"
st compress --in "$OUT" --out "$OUT-svd" --overwrite --method svd --rank 0.25 --finetune-epochs 10 --lr 0.02 \
  --batch-size 64 --device cpu --threads "$THREADS" --profiles rx580,cpu --profile-batch 32 --no-progress
echo
echo "== 6. the same, keeping a factorised layer only where it is measured faster here"
st compress --in "$OUT" --out "$OUT-svd-guarded" --overwrite --method svd --rank 0.25 --min-speedup 1.0 \
  --finetune-epochs 10 --lr 0.02 --batch-size 64 --device cpu --threads "$THREADS" \
  --profiles rx580,cpu --profile-batch 32 --no-progress
echo "per-layer decisions and measured times: $OUT-svd-guarded/report.txt"
echo
echo "== 7. serve the three models over HTTP (KServe v2 + simple JSON), send real digits, stop"
"$PY" scripts/bench_serve/demo_client.py --runs-dir "$(dirname "$OUT")" --threads "$THREADS"
echo
echo "demo done: model directories in $OUT, $OUT-svd, $OUT-svd-guarded"
