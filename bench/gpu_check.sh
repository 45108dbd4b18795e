#!/usr/bin/env bash
# GPU acceptance in one run (issue #16): build, parity tests and benchmarks on one GPU (an H200 with
# a CUDA build of torch) in at most 8 minutes of wall time, everything written as it goes.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]             # or TSV_FAST_GPU_CHECK_OUT=RESULTS_DIR
#   TSV_FAST_GPU_CHECK_DRYRUN=1 bash bench/gpu_check.sh DIR   # every step on the CPU, tiny sizes (CI)
#
# Steps, most informative first; each has a time cap, and a step that would overrun the budget
# (TSV_FAST_GPU_CHECK_BUDGET_S, default 465 s) is skipped with a line saying so:
#   env            GPU, driver, torch, CUDA, triton, numpy versions, git sha (TSV_FAST_GIT_SHA if no .git)
#   build          tsv_fast._C for sm90 only, all cores, forced (a fallback to pure Python is an
#                  error); runs in the background while the Triton tests compile
#   triton-tests   the real-shape Triton tests at native precision (pytest -m gpu), first autotune
#                  config only (cold cache)
#   ext-tests      the extension's GPU tests, the CUDA merge parity and LoRA on CUDA
#   cusolver-bench batched cuSOLVER top-k / eigh vs torch.linalg.svd / eigh loops, ViT-L/14 4096x1024, T=20
#   kernel-bench   task Gram vs cuBLAS, reconstruction vs GEMM+add+cast, STI, stack Gram (ViT-L/14 MLP, T=20)
#   merge-bench    ViT-L/14, T=20, whole encoder: ours per backend; the authors' route on 1 block,
#                  extrapolated (marked so); accuracy contract per matrix
#   topk-bench     per-task top-k on the GPU (issue #18): authors' SVD, Gram and certified Krylov
#                  routes on the ViT-B/32 shapes at T = 8 and 20, time against each route's GEMM floor
#   triton-native  every other Triton test natively on the GPU, if time is left
#   report         the table of steps, tests, goals with their floors, and which backend `auto`
#                  should take per op on CUDA; printed last
# On the GPU run a skipped GPU test is a failure (bench/gpu_check_pytest.py).
# TSV_FAST_GPU_CHECK_STEPS=build,ext-tests,merge-bench (say) reruns only those steps (env and the
# report always run), for a second call with the device time that is left.
#
# RESULTS_DIR gets at most 6 files (the device tool returns 8): gpu_check.log, steps.tsv, tests.jsonl,
# build.log, summary.json and results.tar.gz (the benchmark files, repacked after every step, ready
# for bench/results/; `python bench/gpu_check.py apply RESULTS_DIR` puts them there and regenerates
# the README tables). On a GPU run the benchmark files are also copied into bench/results/ here.
# Exit status: 0 when every step that ran passed (and, on a dry run, every step ran).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${TSV_FAST_GPU_CHECK_DRYRUN:-0}
OUT=${1:-${TSV_FAST_GPU_CHECK_OUT:-$(mktemp -d /tmp/tsv_fast_gpu_check.XXXXXX)}}
BUDGET=${TSV_FAST_GPU_CHECK_BUDGET_S:-465}
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RAW=$(mktemp -d /tmp/tsv_fast_gpu_check_raw.XXXXXX)
: > "$OUT/steps.tsv"
: > "$OUT/tests.jsonl"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

export PYTHONPATH="$ROOT:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# torch takes CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime_api.h ]; then export CUDA_HOME=/usr/local/cuda; fi
export TSV_FAST_GPU_CHECK_TESTS="$OUT/tests.jsonl"
[ "$DRY" = 1 ] || export TSV_FAST_BENCH_REQUIRE_GPU=1  # a benchmark that finds no GPU fails its step
NPROC=$(nproc 2>/dev/null || echo 4)
XDIST=""  # word-split on purpose below (steps run in `bash -c` under timeout: no arrays)
if [ "$DRY" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
KERNEL_TESTS="tests/test_task_gram.py tests/test_stack_gram.py tests/test_sti.py tests/test_reconstruct.py"
export DRY OUT RAW PY NPROC XDIST KERNEL_TESTS

elapsed() { echo $(( $(date +%s) - START )); }
STEPS=${TSV_FAST_GPU_CHECK_STEPS:-}
selected() { [ -z "$STEPS" ] || [ "$1" = env ] || [[ ",$STEPS," == *",$1,"* ]]; }

record() {  # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"
  echo "=== [$1] $2 (${3}s) $4"
}

pack() { tar -czf "$OUT/results.tar.gz" -C "$RAW" . 2>/dev/null; }

# step NAME EST_S CAP_S FUNCTION: run the (exported) FUNCTION under `timeout` if ~EST_S seconds are
# left, with a cap that keeps 25 s for the report.
step() {
  local name=$1 est=$2 cap=$3 fn=$4
  local left=$(( BUDGET - $(elapsed) ))
  if ! selected "$name"; then
    record "$name" skipped 0 "not selected (TSV_FAST_GPU_CHECK_STEPS=$STEPS)"
    return
  fi
  if (( left < est )); then
    record "$name" skipped 0 "would overrun the budget: needs ~${est}s, ${left}s left"
    return
  fi
  (( cap > left - 25 )) && cap=$(( left - 25 ))
  (( cap < 5 )) && cap=5
  echo "=== [$name] start at +$(elapsed)s, cap ${cap}s"
  local t0 rc
  t0=$(date +%s)
  STEP_CAP=$cap timeout --kill-after=15 "$cap" bash -c "$fn"
  rc=$?
  local dt=$(( $(date +%s) - t0 )) note=""
  [ -f "$RAW/.note" ] && note=$(cat "$RAW/.note") && rm -f "$RAW/.note"  # a step's own one-line note
  if (( rc == 0 )); then record "$name" ok "$dt" "$note"
  elif (( rc == 124 || rc == 137 )); then record "$name" timeout "$dt" "killed at its ${cap}s cap${note:+; $note}"
  else record "$name" failed "$dt" "exit status $rc${note:+; $note}"
  fi
  pack
}

run_pytest() {  # run_pytest STEP ARGS...: the GPU test policy (a skip fails) and the per-test log
  local name=$1
  shift
  TSV_FAST_GPU_CHECK_STEP=$name TSV_FAST_GPU_CHECK_NO_SKIPS=1 \
    "$PY" -m pytest -q -rfE -p gpu_check_pytest -p no:cacheprovider "$@"
}

# ------------------------------------------------------------------------------------- the steps
env_step() { "$PY" bench/gpu_check.py env "$OUT" --dry-run "$DRY"; }

build_cmd() {  # the sm90-only build with all cores; forced: a pure-Python fallback is an error
  env -u TSV_FAST_SKIP_CUDA_BUILD TSV_FAST_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC \
    "$PY" setup.py -q build_ext --inplace
}

build_wait() {  # wait for the background build, then import the extension and print what was built
  local waited=0
  while [ ! -f "$RAW/.build_rc" ] && (( waited < STEP_CAP )); do sleep 1; waited=$((waited + 1)); done
  tail -n 25 "$OUT/build.log"
  [ -f "$RAW/.build_rc" ] || { echo "build: still running"; echo "still running after ${waited}s of waiting" > "$RAW/.note"; return 1; }
  echo "background build took $(cat "$RAW/.build_s")s" > "$RAW/.note"
  [ "$(cat "$RAW/.build_rc")" = 0 ] || { echo "build: FAILED (see build.log)"; return 1; }
  "$PY" -c "import torch, tsv_fast._C as C; print('tsv_fast._C: cuSOLVER', C.cusolver_version(), 'built against', C.CUSOLVER_BUILD_VERSION, 'XsyevBatched', C.has_xsyev_batched())" &&
    "$PY" -m tsv_fast.info
}

dry_build() {  # no CUDA torch here: the forced build must refuse with its reason, before building
  local log
  log=$(env -u TSV_FAST_SKIP_CUDA_BUILD TSV_FAST_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC \
        "$PY" setup.py -q build_ext --inplace 2>&1)
  local rc=$?
  echo "$log" | tail -n 3
  echo "$log" > "$OUT/build.log"
  (( rc != 0 )) && grep -q "TSV_FAST_FORCE_CUDA_BUILD=1 but tsv_fast._C cannot be built" <<< "$log"
}

triton_tests() {
  if [ "$DRY" = 1 ]; then  # interpreter: the quick tests of each kernel file
    run_pytest triton-tests $KERNEL_TESTS -k "rejects or shape_errors or two_dim_input or overlapping"
  else
    TSV_FAST_TRITON_AUTOTUNE=0 run_pytest triton-tests $XDIST -m gpu $KERNEL_TESTS
  fi
}

ext_tests() {
  if [ "$DRY" = 1 ]; then
    run_pytest ext-tests tests/test_cusolver.py -m "not gpu"
    return
  fi
  local rc=0
  run_pytest ext-tests $XDIST -m gpu tests/test_cusolver.py || rc=1
  # the CUDA merge parity and LoRA on CUDA (not marked gpu: selected by name)
  TSV_FAST_TRITON_AUTOTUNE=0 run_pytest ext-tests $XDIST tests/test_merge.py::test_cuda_merge_matches_reference_at_layer_shape \
    tests/test_lora.py::test_lora_merge_on_cuda_matches_cpu || rc=1
  return $rc
}

cusolver_bench() {
  if [ "$DRY" = 1 ]; then
    "$PY" bench/bench_cusolver.py --dry-run --quick --shapes 40x24 --tasks 3 --out "$RAW"
  else
    # the goal's baseline (a torch.linalg.svd loop), the Gram routes and the batched cuSOLVER calls;
    # the float64 reference from the Gram's eigh (a float64 SVD of 20 such matrices costs a minute)
    "$PY" bench/bench_cusolver.py --models vit-l-14 --shapes 4096x1024 --tasks 20 --quick --ref-max-dim 0 \
      --time-budget-s $(( STEP_CAP - 20 )) --out "$RAW" --providers "torch.svd loop" \
      "torch.eigh(gram64)" "torch.eigh loop" "ext.svd[gesvda]" "ext.eigh"
  fi
}

kernel_bench() {
  if [ "$DRY" = 1 ]; then
    TSV_FAST_BENCH_DRYRUN=1 TSV_FAST_BENCH_TASKS=3 TSV_FAST_BENCH_RESULTS="$RAW" "$PY" bench/bench_kernels.py
  else
    TSV_FAST_BENCH_SHAPES=vit-l14-mlp TSV_FAST_BENCH_TASKS=20 TSV_FAST_BENCH_RESULTS="$RAW" \
      "$PY" bench/bench_kernels.py task_gram reconstruct sti stack_gram
  fi
}

merge_bench() {
  if [ "$DRY" = 1 ]; then
    "$PY" bench/bench_merge.py --device cpu --workloads tiny-vit:3 --authors-blocks 1 --runs 1 --warmup 0 \
      --providers torch --time-budget-s $(( STEP_CAP - 10 )) --out-dir "$RAW" --tag gpu-check-dryrun \
      --note "gpu_check dry run: CPU, tiny layout, figures meaningless"
    return
  fi
  # backends that can serve CUDA here, the likely fastest first (the run stops at its budget)
  local providers
  providers=$("$PY" -c "from tsv_fast.backends import available_backends as a; r = a('cuda'); print(' '.join(n for n in ('cusolver', 'triton', 'torch') if not r[n]))")
  "$PY" bench/bench_merge.py --device cuda --workloads vit-l-14:20 --authors-blocks 1 --runs 3 --warmup 0 \
    --providers $providers --threads "$NPROC" --time-budget-s $(( STEP_CAP - 45 )) --out-dir "$RAW" \
    --tag gpu-check-vitl14-T20 --note "bench/gpu_check.sh: ViT-L/14 whole encoder, T=20; authors timed on block 0 and extrapolated; runs limited by the time budget"
}

topk_bench() {
  if [ "$DRY" = 1 ]; then
    "$PY" bench/bench_topk.py --classes 64x32:4 --threads 1 --runs 1 --out-dir "$RAW" --label gpu-check-dryrun
  else
    "$PY" bench/bench_topk.py --device cuda --no-merge --threads 1 --runs 3 --out-dir "$RAW" --label gpu-check-ops \
      --note "bench/gpu_check.sh: per-task top-k on the GPU, ViT-B/32 shapes, T = 8 and 20"
  fi
}

triton_native() {
  if [ "$DRY" = 1 ]; then
    run_pytest triton-native tests/test_task_gram.py -m "not gpu" -k "engine_layout"
  else
    TSV_FAST_TRITON_AUTOTUNE=0 run_pytest triton-native $XDIST -m "not gpu and not slow" $KERNEL_TESTS
  fi
}

export -f run_pytest env_step build_wait dry_build triton_tests ext_tests cusolver_bench kernel_bench \
  merge_bench topk_bench triton_native

# ------------------------------------------------------------------------------------- the run
echo "=== bench/gpu_check.sh: results in $OUT, budget ${BUDGET}s, dry run: $DRY, $NPROC CPUs"
step env 1 30 env_step
if [ "$DRY" = 1 ]; then
  step build 5 60 dry_build
else
  if selected build; then
    ( b0=$(date +%s); build_cmd > "$OUT/build.log" 2>&1; rc=$?
      echo $(( $(date +%s) - b0 )) > "$RAW/.build_s"; echo $rc > "$RAW/.build_rc" ) &
  fi
fi
step triton-tests 30 150 triton_tests
[ "$DRY" = 1 ] || step build 5 240 build_wait
step ext-tests 20 120 ext_tests
step cusolver-bench 40 70 cusolver_bench
step kernel-bench 45 100 kernel_bench
step merge-bench 90 300 merge_bench
step topk-bench 30 90 topk_bench
step triton-native 60 150 triton_native

if [ "$DRY" = 1 ]; then
  echo "=== dry run: bench/results/ left alone"
else
  find "$RAW" -maxdepth 1 -type f ! -name ".*" -exec cp {} "$ROOT/bench/results/" \; && \
    echo "=== benchmark files copied into bench/results/"
fi
rm -f "$RAW"/.build_*
pack
"$PY" bench/gpu_check.py report "$OUT" --raw "$RAW" --dry-run "$DRY" --elapsed "$(elapsed)"
status=$?
rm -rf "$RAW"
exec >&- 2>&-  # let tee write the last lines (the table) before the caller reads the output
wait "$TEE_PID" 2>/dev/null
exit $status
