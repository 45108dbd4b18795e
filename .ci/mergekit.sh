#!/usr/bin/env bash
# CI of the mergekit bridge (tsv_fast.integrations.mergekit, `tsv-fast mergekit`): a virtual
# environment of its own, because mergekit pulls transformers 5, peft, accelerate, datasets and
# pandas, which the main test environment need not carry; then tests/test_mergekit.py, which must
# really run: a skipped test (mergekit or transformers missing) fails this script, and so does an
# ImportError (TSV_FAST_REQUIRE_MERGEKIT=1). The CUDA test is deselected here (no GPU in CI).
#
# Env: PYTHON (default python3), TSV_FAST_MERGEKIT_VENV (default /tmp/tsv-fast-ci-mergekit-venv;
#      an existing one is reused and brought up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TSV_FAST_SKIP_CUDA_BUILD=1 TSV_FAST_REQUIRE_MERGEKIT=1
VENV=${TSV_FAST_MERGEKIT_VENV:-/tmp/tsv-fast-ci-mergekit-venv}
started=$(date +%s)

"${PYTHON:-python3}" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: mergekit asks only torch>=2.0.0, so pip keeps this one and pulls no other
pip install -q torch==2.13.0
pip install -q -e ".[mergekit]" "pytest>=7"
python - <<'PY'
import importlib.metadata as md
assert md.version("torch").startswith("2.13.0"), f"torch {md.version('torch')}: the mergekit install replaced it"
print(f"mergekit.sh: mergekit {md.version('mergekit')}, transformers {md.version('transformers')}, torch {md.version('torch')}")
PY
installed=$(date +%s)

log=$(mktemp)
trap 'rm -f "$log"' EXIT
pytest -q -p no:cacheprovider -m "not gpu" -rs tests/test_mergekit.py 2>&1 | tee "$log"
if grep -Eq "[0-9]+ skipped" "$log"; then
  echo "mergekit.sh: tests were skipped; they must run here" >&2
  exit 1
fi
echo "mergekit.sh: install $(( installed - started )) s, tests $(( $(date +%s) - installed )) s"
