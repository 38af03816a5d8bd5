#!/usr/bin/env bash
# One device call: install without network, GPU tests at real sizes, every benchmark -> JSON in $OUT,
# a short table last. Usage on the device machine:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(pwd)/benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

echo "== install (builds slim_ops._C) =="
SLIM_OPS_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5 || exit 1

echo "== GPU tests =="
timeout 240 python3 -m pytest -m gpu -x -q tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

echo "== benchmarks =="
for b in benchmarks/bench_*.py; do
  echo "-- $b"
  timeout 150 python3 "$b" --device cuda --out "$OUT" 2>&1 | tail -25
done
echo "== done in $(( $(date +%s) - t0 )) s =="
