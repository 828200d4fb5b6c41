#!/usr/bin/env bash
# The one command of a GPU session: build, check, benchmark, in order of value, within a
# time budget (default 470 s: one H200 command is limited to 10 minutes and a session has
# 15 minutes of device time, machine start and a rerun included).
#
#     FASTATTN_GIT_COMMIT=<sha> bash benchmarks/device_run.sh OUT_DIR      # on the GPU machine
#     bash benchmarks/device_run.sh --dry-run OUT_DIR                      # the CPU rehearsal (CI)
#
# Options: --budget SECONDS (the whole run), --stages env,smoke,bench,rest (a subset, e.g.
# to rerun on a warm machine). .git does not travel to the device machine: pass the commit
# being measured in FASTATTN_GIT_COMMIT. PYTHON picks the interpreter (default python3),
# DEVICE_RUN_JOBS the pytest-xdist workers of a GPU run (default 8).
#
# Stages, each step under `timeout` with a limit cut to what is left of the budget (a
# step whose limit falls under its minimum is skipped, and the skip recorded):
#   1 env    build fastattn._C for 9.0a only (MAX_JOBS=16; on failure install without
#            it so the Triton kernels still run), then versions, device, nvidia-smi,
#            the extension's import and build_info, and the two ceilings.
#   2 smoke  tests/test_gpu_smoke.py (-m gpu_smoke, pytest -n 8): every op × triton/cuda
#            × fp16/bf16, fwd + bwd, against float64, default configs; then one small
#            call of each CUDA kernel under compute-sanitizer memcheck.
#   3 bench  fastattn-bench --preset quick-gpu (its --time-budget inside the step's limit).
#   4 rest   the other `gpu` tests, then an autotune pass (FASTATTN_AUTOTUNE=1) over the
#            key shapes that writes the configs Triton chose.
# Files in OUT_DIR (flat; the device tool returns at most 8 files of 16 MiB), each
# written as its step runs, so a command killed at its limit still returns them:
#   status.json   every step: status (ok, failed, timeout, skipped), seconds, limit, note
#   run.log       every step's output, one after another
#   env.jsonl  smoke.jsonl  bench.jsonl  gpu-tests.jsonl  autotune.jsonl
# `python -m fastattn.bench.report --device-run OUT_DIR` turns them into results.
#
# --dry-run runs the same steps on CPU: the Triton interpreter, the smoke matrix's tiny
# sizes, the bench preset's CPU sweep, `pip install --dry-run` instead of the build, the
# memcheck calls without compute-sanitizer; and it prints how many Triton kernel variants
# the GPU run compiles (count_compile_variants). It exits non-zero if any step fails.
set -uo pipefail

usage() {
  echo "usage: bash benchmarks/device_run.sh [--dry-run] [--budget SECONDS] [--stages env,smoke,bench,rest] OUT_DIR"
}

dry_run=0
budget=${DEVICE_RUN_BUDGET_S:-470}
stages=env,smoke,bench,rest
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --budget) budget=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --stages) stages=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "device_run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
case $budget in
  '' | *[!0-9]*) echo "device_run.sh: --budget must be a whole number of seconds, got '$budget'" >&2; exit 2 ;;
esac
for stage in ${stages//,/ }; do
  case $stage in
    env | smoke | bench | rest) ;;
    *) echo "device_run.sh: --stages takes env,smoke,bench,rest; got '$stage'" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
start=$(date +%s)
started_iso=$(date -u +%FT%TZ)
deadline=$((start + budget))
work=$(mktemp -d "${TMPDIR:-/tmp}/fastattn-device-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
FILES=(status.json run.log env.jsonl smoke.jsonl bench.jsonl gpu-tests.jsonl autotune.jsonl)
for f in "${FILES[@]}"; do rm -f "${out:?}/$f"; done

export PYTHONUNBUFFERED=1
export FASTATTN_GIT_COMMIT=${FASTATTN_GIT_COMMIT:-$(git rev-parse --short=10 HEAD 2>/dev/null || echo unknown)}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fastattn-device-run-triton-cache}
# Default configs only: no pinned Triton config, no autotuning (stage 4 asks for it).
unset FASTATTN_ATTENTION_CONFIG FASTATTN_LAYER_NORM_CONFIG FASTATTN_FFN_CONFIG \
  FASTATTN_DECODE_ATTENTION_CONFIG FASTATTN_AUTOTUNE FASTATTN_SMOKE_MATRIX
if [ "$dry_run" = 1 ]; then
  mode=dry-run
  jobs=2
  export TRITON_INTERPRET=1 FASTATTN_SMOKE_MATRIX=tiny
  bench_device=cpu
  tiny=(--tiny)
else
  mode=gpu
  jobs=${DEVICE_RUN_JOBS:-8}
  unset TRITON_INTERPRET
  bench_device=cuda
  tiny=()
fi
if $PY -c "import xdist" 2>/dev/null; then
  xdist=(-n "$jobs")
else
  xdist=()
fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p fastattn.bench.pytest_jsonl --tb=short "${xdist[@]}")

steps_json=""
failures=0
compile_count=null
last_rc=0

log() {
  printf '[%s +%ss] %s\n' "$(date -u +%T)" "$(($(date +%s) - start))" "$*" | tee -a "$out/run.log"
}

json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/ }
  s=${s//$'\t'/ }
  printf '"%s"' "$s"
}

count_cubins() {
  find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l | tr -d ' '
}

write_status() {
  cat > "$out/status.json" <<EOF
{
  "mode": "$mode",
  "git_commit": $(json_str "$FASTATTN_GIT_COMMIT"),
  "started": "$started_iso",
  "budget_s": $budget,
  "elapsed_s": $(($(date +%s) - start)),
  "finished": $1,
  "stages": $(json_str "$stages"),
  "triton_cubins_in_cache": $(count_cubins),
  "compile_count": $compile_count,
  "steps": [
    $steps_json
  ]
}
EOF
}

# record STAGE STEP STATUS SECONDS LIMIT NOTE: one step's entry in status.json.
record() {
  local entry
  entry=$(printf '{"stage": %s, "step": %s, "status": %s, "seconds": %s, "limit_s": %s, "note": %s}' \
    "$1" "$(json_str "$2")" "$(json_str "$3")" "$4" "$5" "$(json_str "$6")")
  steps_json="${steps_json:+$steps_json,
    }$entry"
  case $3 in
    failed | timeout) failures=$((failures + 1)) ;;
    skipped) if [ "$dry_run" = 1 ]; then failures=$((failures + 1)); fi ;;
  esac
  write_status false
}

# step_limit PLANNED: PLANNED seconds, or what is left of the budget if that is less.
step_limit() {
  local left=$((deadline - $(date +%s)))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# run_step STAGE STEP PLANNED MINIMUM COMMAND...: run COMMAND under timeout (its output
# appended to run.log and kept in $work/step.out), record how it ended. Never aborts the run.
run_step() {
  local stage=$1 step=$2 minimum=$4 limit t0 rc status note
  limit=$(step_limit "$3")
  shift 4
  if [ "$limit" -lt "$minimum" ]; then
    note="skipped: $((deadline - $(date +%s))) s left of the run's $budget s; the step needs at least $minimum s"
    log "stage $stage $step: $note"
    record "$stage" "$step" skipped 0 "$limit" "$note"
    last_rc=0
    return 0
  fi
  log "stage $stage $step: start, limit $limit s: $*"
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$out/run.log" > "$work/step.out"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok; note="" ;;
    124 | 137) status=timeout; note="killed at its $limit s limit" ;;
    *) status=failed; note="exit status $rc" ;;
  esac
  log "stage $stage $step: $status after $(($(date +%s) - t0)) s${note:+ ($note)}"
  record "$stage" "$step" "$status" "$(($(date +%s) - t0))" "$limit" "$note"
  last_rc=$rc
  return 0
}

wanted() {
  case ",$stages," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

# ------------------------------------------------------------------ stage 1: env + build
stage_env() {
  local build_status build_note t0
  local install=("$PY" -m pip install -v --no-build-isolation --no-deps -e .)
  t0=$(date +%s)
  if [ "$dry_run" = 1 ]; then
    # The same command, without installing: pip prepares the metadata, which runs
    # setup.py's build decision with these variables (it says why nothing is built).
    run_step 1 build 120 10 env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 "${install[@]:0:4}" --dry-run \
      "${install[@]:4}"
    build_status=dry-run
    build_note=$(grep -m1 'fastattn._C' "$work/step.out" || echo 'setup.py said nothing about fastattn._C')
    build_note="dry run, nothing installed; ${build_note#"${build_note%%[![:space:]]*}"}"
  else
    run_step 1 build 170 60 env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 "${install[@]}"
    build_note=$(grep -m1 'fastattn._C' "$work/step.out" || true)
    build_note=${build_note#"${build_note%%[![:space:]]*}"}
    if [ "$last_rc" = 0 ] && grep -q 'not building fastattn._C' "$work/step.out"; then
      # pip succeeded but setup.py skipped the extension (say, nvcc not found): a failure here.
      build_status=failed
      record 1 build-check failed 0 0 "$build_note"
    elif [ "$last_rc" = 0 ]; then
      build_status=ok
    else
      build_status=failed
      build_note="the build failed (see run.log); installed without fastattn._C so the Triton kernels still run"
      run_step 1 install-without-cuda 60 10 env FASTATTN_BUILD_CUDA=0 "${install[@]}"
    fi
  fi
  run_step 1 env 60 15 "$PY" -m fastattn.bench.device_run env --out "$out/env.jsonl" \
    --build-status "$build_status" --build-seconds "$(($(date +%s) - t0))" --build-note "$build_note"
}

# ------------------------------------------------------------------ stage 2: smoke
stage_smoke() {
  run_step 2 smoke 140 30 env FASTATTN_PYTEST_JSONL="$out/smoke.jsonl" \
    "${PYTEST[@]}" tests/test_gpu_smoke.py -m gpu_smoke
  local memcheck=("$PY" -m fastattn.bench.smoke memcheck)
  if [ "$dry_run" = 1 ]; then
    log "stage 2 memcheck: dry run: the calls run without compute-sanitizer (no GPU)"
    run_step 2 memcheck 60 10 "${memcheck[@]}"
  else
    local sanitizer
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [ -x "$sanitizer" ]; then
      run_step 2 memcheck 90 30 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$sanitizer" --tool memcheck --error-exitcode 3 --leak-check no "${memcheck[@]}"
    else
      log "stage 2 memcheck: compute-sanitizer not found"
      record 2 memcheck failed 0 0 "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
    fi
  fi
  if [ "$dry_run" = 1 ]; then
    count_compile_variants
  fi
}

# How many distinct Triton kernel variants the GPU run compiles, counted from the default
# configs and the smoke matrix by the ahead-of-time compile tool,
# `python -m fastattn.kernels.aot --count --matrix smoke --arch 90`, which prints
# "<N> distinct Triton kernel variants for sm_90 ..." (it compiles nothing). Over
# COMPILE_BUDGET the step fails: at 16 cores and 2-5 s a compile, 150 variants are
# about a minute of compiling.
COMPILE_BUDGET=150
count_compile_variants() {
  run_step 2 count 120 10 "$PY" -m fastattn.kernels.aot --count --matrix smoke --arch 90
  local count
  count=$(grep -m1 -oE '^[0-9]+ distinct Triton kernel variants' "$work/step.out" | grep -oE '^[0-9]+')
  if [ "$last_rc" = 0 ] && [ -n "$count" ]; then
    compile_count=$count
    write_status false
    log "Triton kernel variants the GPU run compiles (default configs, smoke matrix): $count (budget $COMPILE_BUDGET)"
    if [ "$count" -gt "$COMPILE_BUDGET" ]; then
      record 2 count-budget failed 0 0 "$count variants is over the budget of $COMPILE_BUDGET"
    fi
  elif [ "$last_rc" = 0 ]; then
    record 2 count-parse failed 0 0 "the AOT tool printed no '<N> distinct Triton kernel variants' line"
  fi
}

# ------------------------------------------------------------------ stage 3: bench
stage_bench() {
  local limit
  limit=$(step_limit 170)
  run_step 3 bench "$limit" 40 "$PY" -m fastattn.bench --preset quick-gpu --device "$bench_device" \
    --jsonl "$out/bench.jsonl" --no-progress --time-budget "$((limit > 50 ? limit - 25 : 25))"
}

# ------------------------------------------------------------------ stage 4: the rest
AUTOTUNE_RESERVE=60
stage_rest() {
  local left=$((deadline - $(date +%s)))
  run_step 4 gpu-tests "$((left - AUTOTUNE_RESERVE))" 30 env FASTATTN_PYTEST_JSONL="$out/gpu-tests.jsonl" \
    "${PYTEST[@]}" tests -m "gpu and not gpu_smoke"
  local limit
  limit=$(step_limit 240)
  run_step 4 autotune "$limit" 20 env FASTATTN_AUTOTUNE=1 "$PY" -m fastattn.bench.device_run autotune \
    --out "$out/autotune.jsonl" --seconds "$((limit > 30 ? limit - 15 : 15))" "${tiny[@]}"
}

# A file over the device tool's 16 MiB does not come back: keep its last 15 MiB.
cap_sizes() {
  local f
  for f in "${FILES[@]}"; do
    if [ -f "$out/$f" ] && [ "$(wc -c < "$out/$f")" -gt $((15 * 1024 * 1024)) ]; then
      tail -c $((15 * 1024 * 1024)) "$out/$f" > "$work/capped" && mv "$work/capped" "$out/$f"
      log "$f was over 15 MiB: kept its last 15 MiB"
    fi
  done
}

log "device_run.sh: $mode run of commit $FASTATTN_GIT_COMMIT, budget $budget s, stages $stages, python $PY," \
  "pytest ${xdist[*]:-(serial: no pytest-xdist)}"
write_status false
if [ "$FASTATTN_GIT_COMMIT" = unknown ]; then
  log "warning: the commit is unknown (no git here): pass FASTATTN_GIT_COMMIT=<sha>"
fi
if wanted env; then stage_env; fi
if wanted smoke; then stage_smoke; fi
if wanted bench; then stage_bench; fi
if wanted rest; then stage_rest; fi
cap_sizes
write_status true
log "done in $(($(date +%s) - start)) s; $failures step(s) failed; files: $(cd "$out" && ls)"
timeout 120 "$PY" -m fastattn.bench.report --device-run "$out" --summary-only 2>&1 | tee -a "$out/run.log"
if [ "$failures" -gt 0 ]; then exit 1; fi
exit 0
