#!/usr/bin/env bash
# CI beside .ci/run (which gets the newest Triton): the Triton kernels under the OLDEST supported
# Triton, 3.6 (pyproject.toml's range; also what the GPU machine's image carries). Two checks:
#   1. every kernel test on the CPU interpreter (numpy < 2.4: Triton 3.6's interpreter predates it);
#   2. every autotune config of every kernel compiled to sm90 cubin (Triton ships ptxas; no GPU).
# Both caught real breakage that the newest Triton hides (fp64 tl.dot without out_dtype, fp64 dots
# of 16-bit loads). Measured: about 4 minutes on 2 cores, most of it the venv install.
# Env: TSV_FAST_TRITON_OLDEST_VENV (default /tmp/tsv-fast-triton-oldest-venv), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TSV_FAST_SKIP_CUDA_BUILD=1
VENV=${TSV_FAST_TRITON_OLDEST_VENV:-/tmp/tsv-fast-triton-oldest-venv}
TRITON_OLDEST=3.6.0

"${PYTHON:-python3}" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0 "triton==$TRITON_OLDEST" "numpy<2.4" pytest
pip install -q -e .   # the package's own dependencies; triton and numpy stay as pinned above
python - "$TRITON_OLDEST" <<'EOF'
import sys, triton
assert triton.__version__ == sys.argv[1], f"expected triton {sys.argv[1]}, got {triton.__version__}"
print(f"triton_oldest: triton {triton.__version__}")
EOF

KERNEL_TESTS=(tests/test_task_gram.py tests/test_stack_gram.py tests/test_sti.py tests/test_reconstruct.py)
pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}"
TSV_FAST_COMPILE_SWEEP=1 pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}" -k "every_config and 90"
echo "triton_oldest: all kernel tests and the sm90 compile sweep pass under triton $TRITON_OLDEST"
