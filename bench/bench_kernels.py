"""Run every kernel benchmark with one command and one measurement of the roofs.

    python bench/bench_kernels.py                 # all four ops
    python bench/bench_kernels.py sti reconstruct # a subset

Writes bench/results/<op>.csv and .json (rows: op, provider, shape, tasks, dtype, precision,
median/quantile ms, TFLOP/s, GB/s, speed-up vs torch, the measured roof, error vs float64, plus GPU
name, versions, git sha, timestamp). Prints a message and exits 0 without CUDA.
"""
from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ceilings, require_cuda  # noqa: E402

OPS = ("task_gram", "stack_gram", "sti", "reconstruct")


def main(argv: list[str]) -> int:
    require_cuda("bench_kernels")
    ops = argv or list(OPS)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; choose from {OPS}")
    roofs = ceilings()
    failed = []
    for op in ops:  # one op failing must not cost the others their numbers
        try:
            importlib.import_module(f"bench_{op}").main(roofs)
        except Exception:
            traceback.print_exc()
            failed.append(op)
    if failed:
        print(f"bench_kernels: FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
