#!/usr/bin/env bash
# Link check of tsv_fast._C without a GPU (opt-in: about 4 minutes on 2 cores with the venv cached,
# plus a one-time 5.5 GB install of the CUDA build of torch from the local wheel store).
#
# .ci/compile_csrc.sh only compiles csrc/ against a CPU torch's headers. This builds the extension
# for real against a CUDA build of torch (torch==2.14.1, cu130), in a copy of the tree, imports it
# (undefined symbols and C++ ABI mismatches fail the import: Python loads extensions with
# RTLD_NOW), and runs tests/test_cusolver_build.py::test_extension_validates_arguments_without_a_device,
# which calls every binding and checks its one-line error (no device needed; a skip fails here).
#
# Env: TSV_FAST_LINK_CHECK_VENV (default /tmp/tsv-fast-link-check-venv; reused when its torch is
#      right), PYTHON (python3, for creating the venv), MAX_JOBS (default: all CPUs).
# Exit: 0 linked, imported and every binding answered as expected; 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_CUDA="2.14.1"
VENV=${TSV_FAST_LINK_CHECK_VENV:-/tmp/tsv-fast-link-check-venv}
start=$(date +%s)

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_CUDA' or torch.version.cuda is None)" 2>/dev/null; then
  echo "link_check: creating $VENV with the CUDA build of torch $TORCH_CUDA (local wheels, ~5.5 GB)"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_CUDA"
fi
PY="$VENV/bin/python"
"$PY" -c "import numpy, scipy, safetensors, typer, tqdm, yaml, setuptools, ninja, pytest" 2>/dev/null ||
  "$PY" -m pip install -q numpy scipy safetensors typer tqdm pyyaml setuptools wheel ninja pytest
# torch takes CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime_api.h ]; then export CUDA_HOME=/usr/local/cuda; fi
"$PY" -c "import torch; print(f'link_check: torch {torch.__version__}, CUDA {torch.version.cuda}, '
          f'GPU visible: {torch.cuda.is_available()}')"

# Build in a copy, so the source tree never holds a .so that a CPU torch cannot load.
WORK=$(mktemp -d /tmp/tsv-fast-link-check.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
tar --exclude=./.git --exclude=./build --exclude='*.so' --exclude=./bench/results -cf - . | tar -xf - -C "$WORK"
cd "$WORK"
build_start=$(date +%s)
TSV_FAST_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" setup.py -q build_ext --inplace > build.log 2>&1 || { tail -n 40 build.log; echo "link_check: BUILD FAILED"; exit 1; }
echo "link_check: built $(ls tsv_fast/_C*.so) in $(( $(date +%s) - build_start ))s"

export PYTHONPATH="$WORK:$WORK/bench"
"$PY" - <<'EOF'
import torch  # noqa: F401 - loads libc10 & co., which the extension links against
import tsv_fast._C as C  # undefined symbols / ABI mismatches fail right here
print(f"link_check: import OK; cuSOLVER {C.cusolver_version()} at run time, {C.CUSOLVER_BUILD_VERSION} at build "
      f"time; XsyevBatched: {C.has_xsyev_batched()}")
EOF
TSV_FAST_GPU_CHECK_NO_SKIPS=1 "$PY" -m pytest -q -s -p gpu_check_pytest -p no:cacheprovider \
  tests/test_cusolver_build.py -k without_a_device
echo "link_check: OK in $(( $(date +%s) - start ))s"
