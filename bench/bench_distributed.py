"""A merge over several processes: measured speed-up and memory per rank, and the plan's balance.

Measured: `tsv-fast merge` of T synthetic fine-tunes of the first --blocks blocks of the ViT-B/32 visual
encoder (fp32 safetensors, tsv_fast.synthetic), with 1 process (`python -m tsv_fast merge`) and with
N processes (`python -m torch.distributed.run --standalone --nproc-per-node N -m tsv_fast merge`),
every process one thread (OMP_NUM_THREADS=1), runs interleaved, the wall time of the whole command
(interpreter starts and rendezvous included: the speed-up is of that), and the merge's own seconds per
rank from its report (the in-merge speed-up: one process's over the slowest rank's). Peak RSS: each rank's own VmHWM (from the merge report),
the single process's VmHWM (bench_memory's wrapper). The outputs of the two are compared key by key:
bitwise, and within testing.assert_same_result.

Estimated (cost model of tsv_fast.engine.partition, not measured): the load balance max/mean of the
plan's split for ViT-L/14 (fp32) and LLaMA-7B (bf16, 32 layers) at N = 8, T = 8, and for the measured
workload; the cost model's seconds are at nominal one-core rates.

The 2-process speed-up needs a quiet machine (2 cores: each rank wants one). Usage:

    python bench/bench_distributed.py                          # ViT-B/32 (12 blocks), T = 8, 1 vs 2 procs, 3 runs
    python bench/bench_distributed.py --blocks 1 --runs 1 --note smoke   # check the script, ~1 min
    python bench/bench_distributed.py --threads                # + one process on 2 threads (same cores)
    python bench/bench_distributed.py --balance-only           # the cost-model figures alone
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_memory import run_measured  # noqa: E402

RESULTS = HERE / "results"
BLOCK = re.compile(r"\.(?:resblocks|layers)\.(\d+)\.")
GOAL = 1.7  # issue #14: 2 CPU processes at least 1.7x faster than one

GENERATE = r"""
import re, sys
from pathlib import Path
from tsv_fast import synthetic
from tsv_fast.io import save_checkpoint
blocks, tasks, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
block = re.compile(r"\.resblocks\.(\d+)\.")
shapes = {k: s for k, s in synthetic.layout("vit-b-32").items() if not block.search(k) or int(block.search(k).group(1)) < blocks}
synthetic.LAYOUTS["bench"] = lambda: shapes
save_checkpoint(dict(synthetic.checkpoint("bench")), folder / "pretrained.safetensors")
for i in range(tasks):  # one model in memory at a time
    save_checkpoint(dict(synthetic.checkpoint("bench", i)), folder / f"ft_{i}.safetensors")
"""


def balance_figures(cases) -> list[dict]:
    """The cost model's split of (layout, dtype, T, N, blocks) plans: estimated, never measured."""
    import torch

    from tsv_fast import synthetic
    from tsv_fast.engine.partition import RATES, Part, balance
    from tsv_fast.engine.plan import make_plan
    from tsv_fast.engine.sources import DenseTasks
    from tsv_fast.methods import get_method
    from tsv_fast.options import Options

    rows = []
    for name, dtype, tasks, count, blocks in cases:
        shapes = synthetic.layout(name)
        if blocks is not None:
            shapes = {k: s for k, s in shapes.items() if not BLOCK.search(k) or int(BLOCK.search(k).group(1)) < blocks}
        synthetic.LAYOUTS["_balance"] = lambda shapes=shapes: dict(shapes)
        try:
            layout = synthetic.LayoutCheckpoint("_balance", getattr(torch, dtype))
        finally:
            del synthetic.LAYOUTS["_balance"]
        source, options = DenseTasks(layout, [layout] * tasks), Options()
        part = Part(0, count)
        part.select(make_plan(source, get_method("tsv-m"), options), source, None, options)
        loads = part.loads()
        rows.append({"workload": name + (f" [{blocks} blocks]" if blocks is not None else ""), "dtype": dtype,
                     "T": tasks, "N": count, "keys": len(part.assignment),
                     "balance_max_over_mean": round(balance(loads), 4),
                     "estimated_seconds_per_rank": [round(x, 2) for x in loads],
                     "largest_key_estimated_seconds": round(max(part.costs.values()), 3),
                     "basis": f"cost model (engine.partition), nominal rates fp64 {RATES.fp64:.3g} FLOP/s, "
                              f"fp32 {RATES.fp32:.3g} FLOP/s, {RATES.bandwidth:.3g} B/s: ESTIMATED, not measured"})
        print(f"balance {rows[-1]['workload']} T={tasks} N={count}: {rows[-1]['balance_max_over_mean']} (estimated)",
              flush=True)
    return rows


def compare(one: Path, two: Path) -> dict:
    import torch

    from tsv_fast.io import open_checkpoint
    from tsv_fast.testing import assert_same_result, rel_fro

    a, b = open_checkpoint(one), open_checkpoint(two)
    assert sorted(a.keys()) == sorted(b.keys()), "the outputs have different keys"
    differ, worst = 0, 0.0
    for key in a.keys():
        x, y = a.load(key), b.load(key)
        if not torch.equal(x, y):
            differ += 1
            assert_same_result(key, y, x)
            worst = max(worst, rel_fro(y, x))
    return {"keys": len(a.keys()), "keys_not_bitwise_equal": differ, "max_rel_fro": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12, help="ViT-B/32 blocks merged (default 12, the whole "
                        "visual encoder: torchrun's one-off start, a few seconds more than one process, weighs least)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--procs", type=int, default=2, help="processes of the distributed run (default 2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", action="store_true", help="also one process on --procs threads (the torch "
                        "backend spreads a chunk's tasks over torch.get_num_threads() workers)")
    parser.add_argument("--balance-only", action="store_true")
    parser.add_argument("--data", type=Path, default=None, help="folder for the checkpoints (default: temporary)")
    parser.add_argument("--note", default="")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from tsv_fast import __version__

    import bench_merge  # the one machine-name helper of the benches

    started = datetime.datetime.now(datetime.timezone.utc)
    results = {"machine": {"platform": platform.platform(), "cpu": bench_merge.device_name(torch.device("cpu")), "cpu_count": os.cpu_count(),
                           "python": platform.python_version(), "torch": torch.__version__, "tsv_fast": __version__,
                           "git_sha": _git_sha(), "omp_num_threads": 1},
               "timestamp": started.isoformat(timespec="seconds"), "note": args.note,
               "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
               "balance": balance_figures([("vit-l-14", "float32", 8, 8, None), ("llama-7b", "bfloat16", 8, 8, None),
                                           ("vit-b-32", "float32", args.tasks, args.procs, args.blocks)])}
    if not args.balance_only:
        results["measured"] = measure(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    label = "balance" if args.balance_only else f"vitb32-{args.blocks}blocks-T{args.tasks}-{args.procs}procs"
    out = args.out_dir / f"distributed_cpu_{started:%Y%m%d}_{label}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results in {out}")


def measure(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    temp = tempfile.TemporaryDirectory(prefix="tsv-bench-dist-") if args.data is None else None
    data = Path(temp.name) if temp else args.data
    data.mkdir(parents=True, exist_ok=True)
    paths = [data / "pretrained.safetensors", *[data / f"ft_{i}.safetensors" for i in range(args.tasks)]]
    if not all(p.exists() for p in paths):
        print(f"writing {len(paths)} checkpoints ({args.blocks} ViT-B/32 blocks) to {data}", flush=True)
        subprocess.run([sys.executable, "-c", GENERATE, str(args.blocks), str(args.tasks), str(data)], check=True, env=env)
    merge = ["tsv_fast", "merge", "--base", str(paths[0]), *map(str, paths[1:]), "--no-progress"]
    launcher = ["torch.distributed.run", "--standalone", f"--nproc-per-node={args.procs}", "-m"]
    # label -> (processes, threads per process); "1xN": one process whose tasks run on N threads
    setups = {"1": (1, 1), str(args.procs): (args.procs, 1),
              **({f"1x{args.procs}threads": (1, args.procs)} if args.threads else {})}
    walls: dict[str, list[float]] = {label: [] for label in setups}
    peaks: dict[str, list[list[int]]] = {label: [] for label in setups}
    seconds: dict[str, list[list[float]]] = {label: [] for label in setups}
    load = [os.getloadavg()]
    for run in range(args.runs):
        for label, (procs, threads) in setups.items():  # interleaved: slow drifts of the machine hit all alike
            out, report = data / f"out-{label}", data / f"report-{label}.json"
            report.unlink(missing_ok=True)
            command = ([*merge, "-o", str(out), "--report", str(report)] if procs == 1 else
                       [*launcher, *merge, "-o", str(out), "--report", str(report)])
            threads_env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
            measured = run_measured(command, dict(env, **threads_env))
            ranks = json.loads(report.read_text()).get("ranks")
            walls[label].append(measured["wall_seconds"])
            peaks[label].append([r["peak_rss_bytes"] for r in ranks] if ranks else [measured["peak_rss_bytes"]])
            seconds[label].append([round(r["seconds"], 2) for r in ranks] if ranks else
                                  [round(json.loads(report.read_text())["seconds"], 2)])
            print(f"run {run + 1}/{args.runs}, {procs} process(es) x {threads} thread(s): "
                  f"{measured['wall_seconds']:.1f} s wall, peak {[round(p / 2**20) for p in peaks[label][-1]]} MiB",
                  flush=True)
        load.append(os.getloadavg())
    many = str(args.procs)
    same = compare(data / "out-1", data / f"out-{many}")
    checkpoint_bytes = paths[0].stat().st_size
    ratio = statistics.median(walls["1"]) / statistics.median(walls[many])
    in_merge = statistics.median(s[0] for s in seconds["1"]) / statistics.median(max(s) for s in seconds[many])
    print(f"speed-up {ratio:.2f}x with {args.procs} processes, whole command (goal >= {GOAL}x: "
          f"{'met' if ratio >= GOAL else 'NOT met'}); in the merge {in_merge:.2f}x; outputs: {same}", flush=True)
    threaded = {}
    if args.threads:  # the same cores as threads of one process (the torch backend's task workers)
        label = f"1x{args.procs}threads"
        threaded = {"threads_speedup_median": round(statistics.median(walls["1"]) / statistics.median(walls[label]), 3),
                    "threads_outputs": compare(data / "out-1", data / f"out-{label}")}
        print(f"one process on {args.procs} threads: {threaded['threads_speedup_median']:.2f}x, whole command", flush=True)
    if temp:
        temp.cleanup()
    return {"workload": f"vit-b-32 [{args.blocks} blocks]", "T": args.tasks, "dtype": "float32",
            "checkpoint_bytes": checkpoint_bytes,
            "runs": args.runs, "setups_processes_threads": setups,
            "wall_seconds": walls, "wall_median_seconds": {k: statistics.median(v) for k, v in walls.items()},
            "speedup_median": round(ratio, 3), "goal": GOAL, "goal_met": ratio >= GOAL,
            "in_merge_speedup_median": round(in_merge, 3),
            "merge_seconds_per_rank": seconds, "peak_rss_bytes_per_rank": peaks, **threaded,
            "load_average_1_5_15_between_runs": [[round(x, 2) for x in entry] for entry in load],
            "outputs": same}


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
