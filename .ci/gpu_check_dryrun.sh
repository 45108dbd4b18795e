#!/usr/bin/env bash
# CI: rehearse bench/gpu_check.sh without a GPU, so the one-shot GPU acceptance script cannot rot.
# Every step runs on the CPU at tiny sizes (the interpreter for Triton, torch stand-ins for the
# extension); the script exits non-zero if any step fails or is skipped, and so does this.
# Measured: about 75 s on 2 cores. Env: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mktemp -d /tmp/tsv-fast-gpu-check-dryrun.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)
TSV_FAST_GPU_CHECK_DRYRUN=1 bash bench/gpu_check.sh "$OUT"
# the files a device run brings back, all present and the verdict recorded
for f in gpu_check.log steps.tsv tests.jsonl build.log summary.json results.tar.gz; do
  [ -s "$OUT/$f" ] || { echo "gpu_check_dryrun: $f missing or empty" >&2; exit 1; }
done
"${PYTHON:-python3}" - "$OUT/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
steps = {s["step"]: s["status"] for s in summary["steps"]}
expected = ["env", "build", "triton-tests", "ext-tests", "cusolver-bench", "kernel-bench", "merge-bench", "topk-bench",
            "triton-native"]
assert list(steps) == expected and set(steps.values()) == {"ok"}, steps
assert summary["verdict"] == "pass" and summary["env"]["dry_run"], summary["verdict"]
assert summary["tests"]["counts"].get("passed", 0) > 0 and set(summary["tests"]["counts"]) == {"passed"}
assert len(summary["goals"]) == 5, sorted(summary["goals"])  # every goal's code path ran
print(f"gpu_check_dryrun: {len(steps)} steps ok, {summary['tests']['counts']['passed']} tests passed, goals computed")
PY
echo "gpu_check_dryrun: OK in $(( $(date +%s) - start ))s"
