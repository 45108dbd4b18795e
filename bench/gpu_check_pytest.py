"""pytest plugin of bench/gpu_check.sh: on the GPU acceptance run a skipped test is a failure.

A build that silently fell back to pure Python, a torch without CUDA or a Triton that does not
import would otherwise turn every GPU test into a skip and the run would look green. Loaded with
``-p gpu_check_pytest`` (bench/ on PYTHONPATH):

* ``TSV_FAST_GPU_CHECK_NO_SKIPS=1``: every skip of a selected test becomes a failure that quotes
  the skip reason;
* ``TSV_FAST_GPU_CHECK_TESTS=<file>``: one JSON line per test (step, nodeid, outcome, seconds,
  reason) is appended to that file, so a run cut short still reports what it ran.
"""
from __future__ import annotations

import json
import os

import pytest

_NO_SKIPS = os.environ.get("TSV_FAST_GPU_CHECK_NO_SKIPS", "0") == "1"
_LOG = os.environ.get("TSV_FAST_GPU_CHECK_TESTS", "")
_STEP = os.environ.get("TSV_FAST_GPU_CHECK_STEP", "")


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr).strip().splitlines()[-1][:300] if longrepr else ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        report.outcome = "failed"
        report.longrepr = (f"SKIPPED ON THE GPU RUN (a skip here hides a missing GPU, extension or "
                           f"Triton): {reason}")


def pytest_runtest_logreport(report) -> None:
    if not _LOG or (report.when != "call" and not (report.skipped or report.failed)):
        return
    if report.when == "teardown" and report.passed:
        return
    line = {"step": _STEP, "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 3),
            "reason": _reason(report) if report.outcome != "passed" else ""}
    with open(_LOG, "a") as handle:  # one write per line: workers of pytest-xdist may append too
        handle.write(json.dumps(line) + "\n")


def pytest_configure(config) -> None:
    # with pytest-xdist only the controller writes the log (workers' reports reach it)
    global _LOG
    if hasattr(config, "workerinput"):
        _LOG = ""
