#!/usr/bin/env bash
# Everything a session lent a GPU should run, in stages that each fit the device tool's 10-minute
# limit:  bash bench/gpu_session.sh build|tests|kernels|cusolver|merge|lora
# Results (CSV/JSON with GPU name, versions, git sha) land in bench/results/; commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
case "${1:-all}" in
  build)     # the extension needs torch in the build environment
             pip install --no-build-isolation -e ".[test]" && python -m tsv_fast.info ;;
  tests)     pytest -q tests/test_cusolver.py tests/test_task_gram.py tests/test_stack_gram.py \
               tests/test_sti.py tests/test_reconstruct.py tests/test_merge.py tests/test_lora.py -rs ;;
  kernels)   python bench/bench_kernels.py ;;
  cusolver)  python bench/bench_cusolver.py --models vit-b-32 && python bench/bench_cusolver.py --models vit-l-14 ;;
  merge)     python bench/bench_merge.py --config full --device cuda ;;
  lora)      python bench/bench_lora.py --device cuda --dense-runs 3 ;;
  all)       for stage in build tests kernels cusolver merge lora; do bash "$0" "$stage"; done ;;
  *)         echo "unknown stage $1" >&2; exit 2 ;;
esac
