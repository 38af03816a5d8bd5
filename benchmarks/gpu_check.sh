#!/usr/bin/env bash
# GPU evidence for every kernel in one short call on a Hopper machine; always returns what ran.
#
# Stages (each under `timeout`; the plan is printed first, stages 0-2 total 420 s = 7 min):
#   0 (60 s)   versions (torch, triton, CUDA, driver, device, setuptools, ...); build slim_ops._C for sm_90a only
#              (pip --no-build-isolation, CMake + Ninja if pip fails). A failed build skips the CUDA backend
#              with the reason recorded (summary.json: cuda_backend); nothing else stops.
#   1 (180 s)  benchmarks/quick_gpu.py: every kernel at one real size vs its reference.py (rel err, NaN never
#              passes, poisoned outputs, fresh random inputs) and timed with its baselines in the same process;
#              one process per op, so a fatal device error in one kernel keeps the other ops' evidence.
#   2 (180 s)  pytest -m gpu without -x, per-test timeout (pytest-timeout; faulthandler dumps if it is missing),
#              compile-heavy tests (torch.compile / opcheck) last.
#   3 (420 s)  only with --stage3, as a second call: FlexAttention and torch.compile baselines.
# Every stage appends to one summary.json and one gpu_check.log as it goes; on exit (also on a timeout, a crash
# or SIGTERM: trap, plus a watchdog that stops the run before the caller's limit) everything is packed into one
# archive. $OUT receives 3 files: gpu_check_<UTC date>-<device>.tar.gz, summary.json, gpu_check.log.
#
# On the device machine (one call; the machine's start-up comes on top; the archive comes back from $OUT):
#   run(command="GIT_SHA=<sha of the pushed main commit> bash benchmarks/gpu_check.sh", timeout_s=540)
#   (.git does not travel: pass the commit by hand, e.g. GIT_SHA=$(git rev-parse HEAD) pasted literally; commit
#    first so the sha names the tree that ran.) Stage 3 later, as a second call if time is left:
#   run(command="GIT_SHA=<sha> bash benchmarks/gpu_check.sh --stage3", timeout_s=540)
# Then commit the results at once (a result that is not committed is lost):
#   tar xzf <files_at>/gpu_check_<date>-<device>.tar.gz -C benchmarks/results/
#     -> benchmarks/results/<UTC date>-<device>/: summary.json, README.md, tau_budget_<device>.json,
#        masked_logprob_<device>.json, policy_loss_<device>.json, attention_<device>.json, gpu_check.log, logs/
#   edit benchmarks/results/<UTC date>-<device>/README.md (the run's table is there; add what the numbers show
#   and name every kernel found wrong), then
#   git add benchmarks/results/<UTC date>-<device> && git commit -m "results: GPU evidence on <device>"
#
# Options: --dry-run   the same flow on the CPU (tiny shapes, Triton interpreter, CUDA backend skipped with a
#                      reason, no build); the test-suite runs it (tests/test_gpu_check.py), so it cannot rot.
#          --stage3    stages 0 and 3 only.       --stages "0 1 2"   any subset, in order.
# Env: OUT (default runs/gpu_check), GIT_SHA, PYTHON (default python3), PER_TEST_TIMEOUT (s, default 60).
# Missing Python packages can travel as wheels in .whl/ (carry it); they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
DRY=0
STAGES="0 1 2"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stage3) STAGES="0 3" ;;
    --stages) shift; STAGES=${1:-} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$1' (use --dry-run, --stage3, --stages LIST)" >&2; exit 2 ;;
  esac
  shift
done

# ---- budgets (seconds): the GPU plan is what the real run gets; the dry run gets its own (CPU, interpreter)
G0=60 G1=180 G2=180 G3=420
PLAN_TOTAL=$((G0 + G1 + G2))
B0=$G0 B1=$G1 B2=$G2 B3=$G3
if [ "$DRY" = 1 ]; then B0=60 B1=400 B2=200 B3=400; fi  # a loaded 2-core CI box: generous
PER_TEST_TIMEOUT=${PER_TEST_TIMEOUT:-60}
WATCHDOG_S=0
for s in $STAGES; do case $s in 0) WATCHDOG_S=$((WATCHDOG_S + B0));; 1) WATCHDOG_S=$((WATCHDOG_S + B1));;
  2) WATCHDOG_S=$((WATCHDOG_S + B2));; 3) WATCHDOG_S=$((WATCHDOG_S + B3));; esac; done
WATCHDOG_S=$((WATCHDOG_S + 30))

# ---- where things go
OUT=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  GPU_NAME=cpu
else
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  GPU_NAME=${GPU_NAME:-unknown-gpu}
fi
SLUG=$(printf '%s' "$GPU_NAME" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
[ "$DRY" = 1 ] && SLUG_DIR="$SLUG-dry-run" || SLUG_DIR=$SLUG
case " $STAGES " in *" 3 "*) SLUG_DIR="$SLUG_DIR-stage3" ;; esac
RUN_NAME="$(date -u +%Y-%m-%d)-$SLUG_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RES="$WORK/$RUN_NAME"
LOGDIR="$RES/logs"
mkdir -p "$LOGDIR"
LOG="$RES/gpu_check.log"
SUMMARY="$RES/summary.json"
ARCHIVE="gpu_check_$RUN_NAME.tar.gz"
T_START=$(date +%s)
CHILD=""
WATCHDOG=""
FAILED=0

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - T_START )); }

# summary.json helper (plain python, no torch): summ set key=<json> ... | summ str key=<text> ... |
# summ stage <n> <name> <rc> <seconds> <note>
summ() {
  "$PY" - "$SUMMARY" "$@" <<'PY'
import json, os, sys
path, mode, *rest = sys.argv[1:]
try:
    with open(path) as f:
        d = json.load(f)
except (OSError, ValueError):
    d = {}
def val(s):
    try:
        return json.loads(s)
    except ValueError:
        return s
if mode in ("set", "str"):  # set: values are JSON when they parse as JSON; str: always text
    for pair in rest:
        key, _, v = pair.partition("=")
        cur = d
        *parents, last = key.split(".")
        for k in parents:
            cur = cur.setdefault(k, {})
        cur[last] = val(v) if mode == "set" else v
elif mode == "stage":
    n, name, rc, secs, note = rest
    rc = int(rc)
    status = {0: "ok", 124: "timeout", 137: "timeout (killed)", 143: "stopped"}.get(rc, "failed")
    d.setdefault("stages", []).append({"stage": int(n), "name": name, "rc": rc, "status": status,
                                       "seconds": int(secs), "note": note})
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(d, f, indent=1)
os.replace(tmp, path)
PY
}

# run_step NAME BUDGET CMD...: CMD under `timeout`, output to logs/NAME.log, the run log and the console.
run_step() {
  local name=$1 budget=$2 rc
  shift 2
  if [ "$budget" -lt 5 ]; then say "  ($name: no time left in this stage's budget)"; return 124; fi
  timeout -k 5 "$budget" "$@" >"$LOGDIR/$name.log" 2>&1 </dev/null &
  CHILD=$!
  tail -s 0.2 -n +1 -f --pid="$CHILD" "$LOGDIR/$name.log" 2>/dev/null | tee -a "$LOG" &
  local tailer=$!
  wait "$CHILD"
  rc=$?
  wait "$tailer" 2>/dev/null
  CHILD=""
  return $rc
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
  if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; fi
  [ "$rc" = 0 ] && [ "$FAILED" != 0 ] && rc=1
  summ str "finished=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  summ set "total_seconds=$(elapsed)" "exit_code=$rc"
  say "== result ($(elapsed) s, exit $rc) =="
  "$PY" - "$SUMMARY" "$RES/README.md" <<'PY' 2>&1 | tee -a "$LOG"
import contextlib, io, json, sys
d = json.load(open(sys.argv[1]))
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    for s in d.get("stages", []):
        print(f"stage {s['stage']} {s['name']:<14} {s['status']:<8} {s['seconds']:>4} s  {s['note']}")
    cb = d.get("cuda_backend")
    if cb:
        print(f"CUDA backend: {'built (' + str(cb.get('how')) + ')' if cb.get('built') else 'skipped: ' + str(cb.get('reason'))}")
    for op, p in d.get("ops", {}).items():
        cases = p.get("cases", [])
        ok = sum(bool(c.get("correct")) for c in cases)
        print(f"{op}: {ok}/{len(cases)} correct, {len(p.get('skipped', []))} skipped")
        for c in cases:
            ms = c.get("ms")
            ms = f"{ms:10.4f} ms" if isinstance(ms, (int, float)) else "         - ms"
            err = c.get("rel_err")
            err = f"{err:.1e}" if isinstance(err, (int, float)) else str(err)
            base = ", ".join(f"{k} {v:.4g}" for k, v in c.get("baselines", {}).items()
                             if isinstance(v, (int, float)) and not k.endswith(("_mib", "_tflops")))
            print(f"  {'ok ' if c.get('correct') else 'BAD'} {c['name'][:58]:<58} rel {err:>8} {ms}  [{base}]"
                  + (f"  {c['error'][:160]}" if c.get("error") else ""))
        for s in p.get("skipped", []):
            print(f"  skip {s['name']}: {s['reason'][:150]}")
    t = d.get("tests")
    if t:
        print(f"pytest -m gpu: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
              f"{t.get('skipped', 0)} skipped, {t.get('not_run', 0)} not reached")
        for f in t.get("failures", [])[:30]:
            print(f"  FAILED {f}")
sys.stdout.write(buf.getvalue())
with open(sys.argv[2], "w") as f:
    f.write(f"# GPU check {d.get('run')} ({d.get('device')}, commit {d.get('git_sha')})\n\n"
            "The table below is the run's own summary (benchmarks/gpu_check.sh); every number is in summary.json\n"
            "and the per-op JSON files. Whoever commits the run writes above the table what the numbers show\n"
            "and names every kernel found wrong on the GPU.\n\n"
            "```\n" + buf.getvalue() + "```\n")
PY
  tar -czf "$OUT/$ARCHIVE" -C "$WORK" "$RUN_NAME" 2>&1 | tee -a "$LOG"
  cp "$SUMMARY" "$OUT/summary.json"
  cp "$LOG" "$OUT/gpu_check.log"
  echo "archive: $OUT/$ARCHIVE  (unpack into benchmarks/results/ and commit, see the header of this script)"
  rm -rf "$WORK"
  exit "$rc"
}
on_signal() { say "!! signal received after $(elapsed) s: stopping, packing what ran"; FAILED=1; exit 143; }
trap finish EXIT
trap on_signal INT TERM
# the watchdog stops the run (and packs it) before the caller's own limit kills everything
( trap 'kill "$sp" 2>/dev/null; exit 0' TERM; sleep "$WATCHDOG_S" & sp=$!; wait "$sp" && kill -TERM $$ ) \
  >/dev/null 2>&1 &
WATCHDOG=$!

say "gpu_check: $RUN_NAME  stages: $STAGES  dry-run: $DRY  started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "time plan (GPU run): stage 0 $G0 s + stage 1 $G1 s + stage 2 $G2 s; stages 0-2 total: $PLAN_TOTAL s" \
    "($((PLAN_TOTAL / 60)).$((PLAN_TOTAL % 60 * 10 / 60)) min); stage 3: $G3 s in a second call"
[ "$DRY" = 1 ] && say "dry-run budgets (CPU): stage 0 $B0 s, stage 1 $B1 s, stage 2 $B2 s, stage 3 $B3 s"
say "watchdog: ${WATCHDOG_S} s; results: $OUT/$ARCHIVE"
summ str "run=$RUN_NAME" "stages_requested=$STAGES" "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "git_sha=${GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" "device=$GPU_NAME"
summ set "dry_run=$([ "$DRY" = 1 ] && echo true || echo false)" \
  "time_plan_s={\"stage0\": $G0, \"stage1\": $G1, \"stage2\": $G2, \"stages_0_2\": $PLAN_TOTAL, \"stage3\": $G3}" \
  "budgets_s={\"stage0\": $B0, \"stage1\": $B1, \"stage2\": $B2, \"stage3\": $B3, \"watchdog\": $WATCHDOG_S}"
export GIT_SHA=${GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
[ "$GIT_SHA" = unknown ] && say "warning: GIT_SHA is not set and there is no .git here: the results name no commit"

# ------------------------------------------------------------------------------------------------ stage 0
stage0() {
  local t0 deadline rc how="" reason=""
  t0=$(date +%s)
  deadline=$((t0 + B0))
  say "== stage 0: versions, build slim_ops._C for sm_90a (budget $B0 s) =="
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "  wheels from .whl/ -> /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOGDIR/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  cat >"$WORK/versions.py" <<'PY'
import importlib, json, platform, shutil, subprocess
v = {"python": platform.python_version(), "machine": platform.machine()}
for mod in ("torch", "triton", "setuptools", "pybind11", "pytest", "pytest_timeout", "transformers", "hypothesis",
            "numpy"):
    try:
        v[mod] = getattr(importlib.import_module(mod), "__version__", "present")
    except Exception as exc:  # noqa: BLE001
        v[mod] = f"missing ({type(exc).__name__})"
try:
    import torch
    v["torch_cuda"] = torch.version.cuda
    v["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        v["device_name"] = torch.cuda.get_device_name()
        v["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
except Exception as exc:  # noqa: BLE001
    v["torch_error"] = str(exc)
def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable ({type(exc).__name__})"
v["nvidia_smi"] = cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader") if shutil.which("nvidia-smi") else "absent"
v["nvcc"] = cmd("nvcc", "--version").splitlines()[-1] if shutil.which("nvcc") else "absent"
v["cmake"] = cmd("cmake", "--version").splitlines()[0] if shutil.which("cmake") else "absent"
v["ninja"] = cmd("ninja", "--version") if shutil.which("ninja") else "absent"
for k, val in v.items():
    print(f"  {k}: {val}")
print("VERSIONS_JSON " + json.dumps(v))
PY
  run_step versions 30 "$PY" "$WORK/versions.py"
  local vjson
  vjson=$(grep '^VERSIONS_JSON ' "$LOGDIR/versions.log" | tail -1 | cut -d' ' -f2-)
  [ -n "$vjson" ] && summ set "versions=$vjson"

  if [ "$DRY" = 1 ]; then
    reason="dry run on the CPU: the CUDA backend needs a GPU (not built, not exercised)"
  else
    local pip_budget=$((deadline - $(date +%s) - 20))  # leave the CMake fallback at least 20 s
    [ $pip_budget -gt 40 ] && pip_budget=40
    SLIM_OPS_CUDA=ON SLIM_OPS_CUDA_ARCHS="compute_90a,sm_90a" run_step build_pip $pip_budget \
      "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    rc=$?
    if [ $rc = 0 ] && "$PY" -c "import slim_ops._C" 2>>"$LOGDIR/build_pip.log"; then
      how=pip
    else
      say "  pip build failed (rc $rc, logs/build_pip.log): CMake fallback"
      SLIM_OPS_CUDA_ARCHS="compute_90a,sm_90a" run_step build_cmake $((deadline - $(date +%s))) bash -c \
        "cmake -S . -B /tmp/slim_ops_build -G Ninja -DPython3_EXECUTABLE=\"\$(command -v $PY)\" \
         -DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/slim_ops_build -j"
      rc=$?
      if [ $rc = 0 ] && "$PY" -c "import slim_ops._C" 2>>"$LOGDIR/build_cmake.log"; then
        how=cmake
      else
        reason="slim_ops._C build failed: pip (logs/build_pip.log) and CMake (logs/build_cmake.log, rc $rc)"
      fi
    fi
  fi
  if [ -n "$how" ]; then
    summ set "cuda_backend={\"built\": true, \"how\": \"$how\", \"archs\": \"compute_90a,sm_90a\"}"
    say "  slim_ops._C built with $how (sm_90a)"
  else
    export SLIM_OPS_SKIP_CUDA_REASON="$reason"
    summ set "cuda_backend={\"built\": false, \"reason\": $("$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$reason")}"
    say "  CUDA backend skipped: $reason"
  fi
  summ stage 0 build "$([ -n "$how" ] || [ "$DRY" = 1 ] && echo 0 || echo 1)" $(( $(date +%s) - t0 )) \
    "${how:+_C built with $how}${reason}"
}

# ------------------------------------------------------------------------------------------------ stage 1
# One process per op, so that a fatal device error (an illegal address poisons the CUDA context) in one kernel
# cannot take the other ops' evidence with it. Shares of the budget in seconds; time an op leaves unused passes on.
QUICK_OPS="tau_budget:50 policy_loss:20 masked_logprob:50 attention:60"
stage1() {
  local t0 rc=0 r carry=0 op share budget args=() notes=""
  t0=$(date +%s)
  say "== stage 1: quick check, every kernel vs reference.py + baselines (budget $B1 s) =="
  [ "$DRY" = 1 ] && args+=(--dry-run)
  for item in $QUICK_OPS; do
    op=${item%%:*}
    share=$(( ${item##*:} * B1 / 180 ))
    budget=$((share + carry))
    local s0
    s0=$(date +%s)
    run_step "quick_$op" "$budget" "$PY" benchmarks/quick_gpu.py --only "$op" --out "$RES" --summary "$SUMMARY" \
      --budget-s $((budget * 3 / 4)) --device-name "$GPU_NAME" "${args[@]}"
    r=$?
    carry=$((budget - ($(date +%s) - s0)))
    [ $carry -lt 0 ] && carry=0
    [ $r = 0 ] || rc=$r
    notes+="$op: $(grep '^quick_gpu: ' "$LOGDIR/quick_$op.log" 2>/dev/null | tail -1 | sed 's/^quick_gpu: //') (exit $r); "
  done
  [ $rc = 0 ] || FAILED=1
  summ stage 1 quick_gpu $rc $(( $(date +%s) - t0 )) "$notes"
}

# ------------------------------------------------------------------------------------------------ stage 2
stage2() {
  local t0 deadline rc_a rc_b tmo=() sel=() files=() note=""
  t0=$(date +%s)
  deadline=$((t0 + B2))
  say "== stage 2: pytest -m gpu, per-test timeout ${PER_TEST_TIMEOUT} s, compile-heavy last (budget $B2 s) =="
  for f in tests/ops/test_tau_budget.py tests/ops/test_tau_budget_cuda.py tests/ops/test_masked_logprob.py \
           tests/ops/test_policy_loss.py tests/ops/test_attention.py tests/gpu tests/slim_rl/test_generate.py; do
    [ -e "$f" ] && files+=("$f")
  done
  files+=(tests)  # any other gpu-marked test, after these (pytest collects each test once)
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    tmo=(--timeout "$PER_TEST_TIMEOUT")
  else
    tmo=(-o "faulthandler_timeout=$PER_TEST_TIMEOUT")
    note="pytest-timeout missing: hung tests dump tracebacks (faulthandler) and the stage timeout stops them; "
    say "  $note"
  fi
  if [ -n "${SLIM_OPS_SKIP_CUDA_REASON:-}" ]; then
    sel=(-k "not cuda")
    note+="CUDA backend skipped (${SLIM_OPS_SKIP_CUDA_REASON}): tests named *cuda* deselected; "
  fi
  local common=(-m gpu -v -rfE -p no:cacheprovider -o console_output_style=classic "${tmo[@]}")
  local k_a="not compile and not opcheck" k_b="compile or opcheck"
  [ ${#sel[@]} -gt 0 ] && k_a="$k_a and not cuda" && k_b="($k_b) and not cuda"
  run_step pytest_main $((deadline - $(date +%s) - 40)) "$PY" -m pytest "${common[@]}" -k "$k_a" "${files[@]}"
  rc_a=$?
  run_step pytest_compile $((deadline - $(date +%s))) "$PY" -m pytest "${common[@]}" -k "$k_b" "${files[@]}"
  rc_b=$?
  "$PY" - "$SUMMARY" "$LOGDIR/pytest_main.log" "$LOGDIR/pytest_compile.log" "$rc_a" "$rc_b" <<'PY'
import json, os, re, sys
path, log_a, log_b, rc_a, rc_b = sys.argv[1:]
t = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "selected": 0, "failures": [],
     "rc": [int(rc_a), int(rc_b)]}
pat = re.compile(r"^(\S+::\S+(?:\[.*?\])?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
for log in (log_a, log_b):
    try:
        lines = open(log, errors="replace").read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.search(r"collected (\d+) items?(?: / (\d+) deselected / (\d+) selected)?", line)
        if m:
            t["selected"] += int(m.group(3) if m.group(3) is not None else m.group(1))
            break
    for line in lines:
        m = pat.match(line)
        if not m:
            continue
        key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}.get(m.group(2))
        if key:
            t[key] += 1
        if m.group(2) in ("FAILED", "ERROR"):
            t["failures"].append(m.group(1))
    t.setdefault("short_summary", []).extend([ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))][:40])
t["not_run"] = max(0, t["selected"] - t["passed"] - t["failed"] - t["errors"] - t["skipped"])  # stage time ran out
d = json.load(open(path))
d["tests"] = t
json.dump(d, open(path + ".tmp", "w"), indent=1)
os.replace(path + ".tmp", path)
print(f"  pytest -m gpu: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped, "
      f"{t['not_run']} of {t['selected']} selected not reached")
PY
  local rc=0
  for r in $rc_a $rc_b; do case $r in 0|5) ;; *) rc=$r ;; esac; done
  [ $rc = 0 ] || FAILED=1
  summ stage 2 pytest_gpu $rc $(( $(date +%s) - t0 )) "${note}exit codes main=$rc_a compile=$rc_b"
}

# ------------------------------------------------------------------------------------------------ stage 3
stage3() {
  local t0 rc args=()
  t0=$(date +%s)
  say "== stage 3: FlexAttention and torch.compile baselines (budget $B3 s) =="
  [ "$DRY" = 1 ] && args+=(--dry-run)
  run_step quick_gpu_stage3 "$((B3 - 150))" "$PY" benchmarks/quick_gpu.py --stage3 --out "$RES" \
    --summary "$SUMMARY" --budget-s $((B3 - 180)) --device-name "$GPU_NAME" "${args[@]}"
  rc=$?
  [ $rc = 0 ] || FAILED=1
  summ stage 3 compile_baselines $rc $(( $(date +%s) - t0 )) "$(tail -1 "$LOGDIR/quick_gpu_stage3.log" 2>/dev/null)"
  # one whole SLIM-RL step (SDAR-4B layer shapes, 4 layers, bf16) through slim_ops and the reference path
  local rl=(--preset sdar4b --paths slim reference)
  [ "$DRY" = 1 ] && rl=(--preset tiny --paths slim reference --allow-loaded)
  t0=$(date +%s)
  run_step rl_step 140 "$PY" benchmarks/bench_rl_step.py "${rl[@]}" --out "$RES"
  rc=$?
  summ stage 3 rl_step $rc $(( $(date +%s) - t0 )) "$(tail -1 "$LOGDIR/rl_step.log" 2>/dev/null)"
}

for s in $STAGES; do
  case $s in
    0) stage0 ;; 1) stage1 ;; 2) stage2 ;; 3) stage3 ;;
    *) say "unknown stage '$s' (0-3)"; FAILED=1 ;;
  esac
done
exit 0
