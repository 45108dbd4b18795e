#!/usr/bin/env bash
# Compile-check every .cu / .cpp under csrc/ with the machine's nvcc, so a broken source never
# lands even though CI has no GPU and a CPU-only torch. Nothing is linked or run.
#
# Headers: torch's include dirs (the CPU wheel ships c10/cuda too), Python's, the CUDA toolkit's,
# and cuSOLVER + cuBLAS (cusolverDn.h includes cublas_v2.h) from pinned NVIDIA wheels when the
# toolkit lacks them. The wheels are downloaded once into a cache and only their headers are
# unpacked; nothing is installed into the Python environment.
#
# Env: PYTHON (default: python3), NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc),
#      TSV_FAST_CI_CACHE (default: ~/.cache/tsv_fast_ci).
# Usage: .ci/compile_csrc.sh [FILE...]   (default: every csrc/*.cu and csrc/*.cpp)
# Exit: 0 all compiled; 1 a compile error; 2 the check could not run (no nvcc / torch / headers).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CACHE=${TSV_FAST_CI_CACHE:-$HOME/.cache/tsv_fast_ci}
# Pinned to the CUDA 13.0 generation, matching the nvcc of the dev/CI machines.
CUSOLVER_WHEEL="nvidia-cusolver==12.0.4.66"
CUBLAS_WHEEL="nvidia-cublas==13.0.2.14"

if [ ! -x "$NVCC" ]; then
  echo "compile_csrc: nvcc not found (set NVCC=...); cannot compile-check csrc/" >&2
  exit 2
fi
CUDA_HOME_DIR=$(cd "$(dirname "$NVCC")/.." && pwd)

# Torch and Python include dirs, absolute.
mapfile -t PY_INCLUDES < <("$PYTHON" - <<'EOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print(p)
print(sysconfig.get_paths()["include"])
EOF
)
CXX11_ABI=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")

# cuSOLVER / cuBLAS headers: the toolkit's if present, else the pinned wheels' (cached).
EXTRA_INCLUDES=()
if [ -f "$CUDA_HOME_DIR/include/cusolverDn.h" ] && [ -f "$CUDA_HOME_DIR/include/cublas_v2.h" ]; then
  echo "compile_csrc: using cuSOLVER headers from $CUDA_HOME_DIR/include"
else
  HDR="$CACHE/headers"
  if [ ! -f "$HDR/.complete" ]; then
    echo "compile_csrc: fetching headers from $CUSOLVER_WHEEL and $CUBLAS_WHEEL"
    rm -rf "$CACHE/wheels" "$HDR"
    mkdir -p "$CACHE/wheels" "$HDR"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$CACHE/wheels" \
      "$CUSOLVER_WHEEL" "$CUBLAS_WHEEL"
    # Keep only the headers; the wheels are hundreds of MB of shared libraries.
    "$PYTHON" - "$CACHE/wheels" "$HDR" <<'EOF'
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for whl in src.glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if "/include/" in name and name.endswith(".h"):
                (dst / pathlib.Path(name).name).write_bytes(z.read(name))
EOF
    rm -rf "$CACHE/wheels"
    touch "$HDR/.complete"
  fi
  if [ ! -f "$HDR/cusolverDn.h" ] || [ ! -f "$HDR/cublas_v2.h" ]; then
    echo "compile_csrc: cusolverDn.h / cublas_v2.h missing from $HDR" >&2
    exit 2
  fi
  EXTRA_INCLUDES+=("-I$HDR")
fi

FLAGS=(-std=c++20 -c -Xcompiler -fPIC -O0 -DTORCH_API_INCLUDE_EXTENSION_H
       -DTORCH_EXTENSION_NAME=_C "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI"
       -Xcompiler -Wall -Xcompiler -Werror=return-type -Xcompiler -Wno-unused-function)
for p in "${PY_INCLUDES[@]}"; do FLAGS+=("-isystem" "$p"); done
FLAGS+=("-I$CUDA_HOME_DIR/include" "${EXTRA_INCLUDES[@]}" "-Icsrc")

OUTDIR=$(mktemp -d)
trap 'rm -rf "$OUTDIR"' EXIT

# A CPU-only torch wheel ships c10/cuda/*.h but not the header its CMake generates for CUDA
# builds; recreate it (a CUDA build of torch defines exactly this macro there).
found_macros=0
for p in "${PY_INCLUDES[@]}"; do
  [ -f "$p/c10/cuda/impl/cuda_cmake_macros.h" ] && found_macros=1
done
if [ "$found_macros" -eq 0 ]; then
  mkdir -p "$OUTDIR/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
    > "$OUTDIR/shim/c10/cuda/impl/cuda_cmake_macros.h"
  FLAGS+=("-isystem" "$OUTDIR/shim")
fi
shopt -s nullglob
if [ $# -gt 0 ]; then
  sources=("$@")  # check only the given files
else
  sources=(csrc/*.cu csrc/*.cpp)
fi
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_csrc: no sources under csrc/" >&2
  exit 2
fi

failed=0
for src in "${sources[@]}"; do
  extra=()
  # .cu files also get device code generated, for one real architecture, to catch kernel errors.
  case "$src" in *.cu) extra=(-gencode arch=compute_80,code=sm_80) ;; esac
  start=$(date +%s)
  if "$NVCC" "${FLAGS[@]}" "${extra[@]}" "$src" -o "$OUTDIR/$(basename "$src").o"; then
    echo "compile_csrc: OK   $src ($(( $(date +%s) - start ))s)"
  else
    echo "compile_csrc: FAIL $src" >&2
    failed=1
  fi
done

if [ "$failed" -ne 0 ]; then
  echo "compile_csrc: compile errors in csrc/" >&2
  exit 1
fi

# Without the CUDA libraries nothing can be linked, but our own cross-file references can be
# checked: every tsv:: symbol one object needs must be defined by another.
if [ $# -eq 0 ] && command -v nm > /dev/null; then
  nm -C --defined-only "$OUTDIR"/*.o | awk '$2 ~ /^[TWV]$/' | grep -o ' tsv::.*' | sort -u \
    > "$OUTDIR/defined.txt" || true
  nm -C --undefined-only "$OUTDIR"/*.o | grep -o ' tsv::.*' | sort -u > "$OUTDIR/needed.txt" || true
  missing=$(comm -23 "$OUTDIR/needed.txt" "$OUTDIR/defined.txt")
  if [ -n "$missing" ]; then
    echo "compile_csrc: tsv:: symbols used but defined nowhere in csrc/:" >&2
    echo "$missing" >&2
    exit 1
  fi
  echo "compile_csrc: cross-object check OK ($(wc -l < "$OUTDIR/needed.txt") tsv:: references resolved)"
fi
echo "compile_csrc: all ${#sources[@]} sources compiled"
