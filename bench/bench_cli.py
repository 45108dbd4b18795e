"""How long the command line takes before its first word: `--help`, errors in arguments and paths
(answered before torch loads), and `version` (which loads torch), each in a fresh process.

Each case runs ``--runs`` times; the JSON row holds the median and min wall time, the median CPU time
of the child (user + system) and the load average, since wall time on a shared machine is mostly
waiting. Usage:

    python bench/bench_cli.py                  # 7 runs per case -> bench/results/cli_startup_<date>.json
    python bench/bench_cli.py --runs 2 --out /tmp/cli.json    # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "help": ["--help"],
    "missing base path": ["merge", "-b", "nope", "x", "-o", "y"],
    "bad dtype": ["merge", "-b", "{pre}", "x", "-o", "y", "--dtype", "float16"],
    "output over an input": ["merge", "-b", "{pre}", "{pre}", "-o", "{pre}"],
    "version (loads torch)": ["version"],
}


def run_once(argv: list[str]) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tsv_fast", *argv], capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.returncode


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"cli_startup_{time.strftime('%Y%m%d')}.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        pre = Path(folder) / "pre.safetensors"
        pre.write_bytes(b"")
        for name, argv in CASES.items():
            argv = [a.format(pre=pre) for a in argv]
            runs = [run_once(argv) for _ in range(args.runs)]
            walls, cpus, codes = zip(*runs)
            rows.append({"case": name, "argv": argv, "exit_codes": sorted(set(codes)),
                         "wall_s_median": statistics.median(walls), "wall_s_min": min(walls),
                         "cpu_s_median": statistics.median(cpus), "runs": args.runs,
                         "load_average_1min": os.getloadavg()[0]})
            print(f"{name:24} wall median {rows[-1]['wall_s_median']:.3f} s (min {min(walls):.3f}), "
                  f"cpu {rows[-1]['cpu_s_median']:.3f} s, exit {sorted(set(codes))}, load {os.getloadavg()[0]:.1f}")
    record = {"benchmark": "cli_startup", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "git": git_sha(),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
