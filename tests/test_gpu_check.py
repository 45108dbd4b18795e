"""bench/gpu_check.sh's pytest policy (bench/gpu_check_pytest.py): on the GPU run a skip fails.

The whole script is rehearsed on the CPU by .ci/gpu_check_dryrun.sh; this checks the one rule the
rehearsal cannot show (it has no skips): a skipped test turns into a failure that quotes the
reason, and every test lands in the per-test log.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

SAMPLE = '''
import pytest

def test_passes():
    assert True

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_skips():
    pass
'''


def run(tmp_path, no_skips: bool):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    log = tmp_path / "tests.jsonl"
    env = {**os.environ, "PYTHONPATH": str(BENCH), "TSV_FAST_GPU_CHECK_TESTS": str(log),
           "TSV_FAST_GPU_CHECK_STEP": "sample", "TSV_FAST_GPU_CHECK_NO_SKIPS": "1" if no_skips else "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_check_pytest", "-p", "no:cacheprovider",
                           "test_sample.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, [json.loads(line) for line in log.read_text().splitlines()]


def test_a_skip_fails_the_gpu_run_and_is_logged(tmp_path):
    proc, entries = run(tmp_path, no_skips=True)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "SKIPPED ON THE GPU RUN" in proc.stdout and "needs a CUDA device" in proc.stdout
    outcomes = {entry["nodeid"].split("::")[1]: entry["outcome"] for entry in entries}
    assert outcomes == {"test_passes": "passed", "test_skips": "failed"}, entries
    assert all(entry["step"] == "sample" for entry in entries)


def test_without_the_policy_a_skip_stays_a_skip(tmp_path):
    proc, entries = run(tmp_path, no_skips=False)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert {entry["outcome"] for entry in entries} == {"passed", "skipped"}
