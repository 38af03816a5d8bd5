#!/usr/bin/env bash
# One device call: install without network (builds slim_ops._C), GPU tests at real sizes, benchmarks -> one
# JSON per run in $OUT, a short table last. Aim: well under 6 minutes for everything.
#   bash benchmarks/gpu_check.sh                       # every op
#   bash benchmarks/gpu_check.sh tau_budget logprob    # a subset (tau_budget logprob attention generate)
# Env: TEST_TIMEOUT (s, per op's GPU tests, default 90), BENCH_TIMEOUT (s, per benchmark, default 100).
# The GPU image has torch, triton, pybind11, pytest but not transformers / hypothesis (the generate and HF tests
# and the generate benchmark need transformers): carry them as wheels in .whl/ (see the device tool's README:
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl transformers==5.24.0
# huggingface-hub tokenizers safetensors regex hypothesis ...`); they are installed to /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(pwd)/benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd):$(pwd)/python${PYTHONPATH:+:$PYTHONPATH}"
OPS=${*:-tau_budget logprob attention generate}
TEST_TIMEOUT=${TEST_TIMEOUT:-90}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  echo "== wheels from .whl/ =="
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import transformers" 2>/dev/null || echo "note: transformers missing: generate / HF tests and bench_generate fail"

echo "== install (builds slim_ops._C) =="
SLIM_OPS_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
  || { tail -30 "$OUT/install.log"; exit 1; }
python3 -c "import slim_ops, torch; print('backends on cuda:', slim_ops.available_backends('cuda'))"

declare -A TESTS=(
  [tau_budget]="tests/ops/test_tau_budget.py tests/ops/test_tau_budget_cuda.py"
  [logprob]="tests/ops/test_masked_logprob.py tests/ops/test_policy_loss.py"
  [attention]="tests/ops/test_attention.py tests/test_hf_attention.py"
  [generate]="tests/slim_rl/test_generate.py"
)
declare -A BENCH=(
  [tau_budget]=benchmarks/bench_tau_budget.py [logprob]=benchmarks/bench_logprob.py
  [attention]=benchmarks/bench_attention.py [generate]=benchmarks/bench_generate.py
)
status=0
for op in $OPS; do
  echo "== GPU tests: $op ($(( $(date +%s) - t0 )) s) =="
  timeout "$TEST_TIMEOUT" python3 -m pytest -m gpu -x -q -p no:cacheprovider ${TESTS[$op]} 2>&1 \
    | tee "$OUT/tests_$op.log" | tail -6 || status=1
done
for op in $OPS; do
  echo "== benchmark: $op ($(( $(date +%s) - t0 )) s) =="
  timeout "$BENCH_TIMEOUT" python3 "${BENCH[$op]}" --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_$op.log" \
    | tail -25 || status=1
done
echo "== summary ($(( $(date +%s) - t0 )) s) =="
python3 - "$OUT" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        d = json.load(open(path))
    except Exception as exc:  # a partial file from a benchmark that ran out of time
        print(f"{os.path.basename(path)}: unreadable ({exc})")
        continue
    res = d.get("results")
    if isinstance(res, dict):
        cells = [f"{k} {v['median_ms']:.3f} ms" for k, v in res.items() if isinstance(v, dict) and "median_ms" in v]
        print(f"{d.get('bench', os.path.basename(path))}: " + "; ".join(cells[:8]))
    else:
        print(os.path.basename(path))
PY
exit $status
