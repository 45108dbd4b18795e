"""Peak host memory and wall time of a streamed `tsv-fast merge` against the load-everything route.

For each T, in its own subprocess (OMP_NUM_THREADS=1), on synthetic fp32 checkpoints with real layer
shapes (tsv_fast.synthetic) written as safetensors files:

* ours:    `python -m tsv_fast merge --base pre ft_0 ... ft_{T-1} -o merged.safetensors`
* authors: every checkpoint loaded into memory (as the authors' code torch.loads each model and
           keeps T task vectors), then `tsv_fast.reference.authors_fast_tsv_merge` on the task
           vectors (mode "compute"), or only the loading (mode "load": a lower bound on their peak).

Each child reports its own peak RSS (VmHWM; Linux only). Usage:

    python bench/bench_memory.py --tasks 8 20 --authors compute load
    python bench/bench_memory.py --tasks 3 --layout tiny-vit --authors compute   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

AUTHORS_SCRIPT = r"""
import sys, time, torch
from safetensors.torch import load_file
from tsv_fast.reference import authors_fast_tsv_merge
mode, pre_path, *ft_paths = sys.argv[1:]
started = time.perf_counter()
pretrained = load_file(pre_path)
task_vectors = []
for path in ft_paths:  # the authors keep one task vector per model in memory
    finetuned = load_file(path)
    task_vectors.append({k: finetuned[k] - pretrained[k] for k in pretrained})
    del finetuned
loaded = time.perf_counter() - started
if mode == "compute":
    merged_tv = authors_fast_tsv_merge(task_vectors)
    merged = {k: pretrained[k] + merged_tv[k] for k in pretrained}
print(f"loaded {loaded:.1f}")
"""


# Runs ``python -m MODULE ...`` or ``python -c CODE ...`` and prints the child's own peak RSS: VmHWM
# of its fresh address space. (ru_maxrss from wait4 is carried over fork and exec from the parent.)
WRAPPER = """
import runpy, sys
try:
    if sys.argv[1] == "-c":
        code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
        exec(code, {"__name__": "__main__"})
    else:
        sys.argv = sys.argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    print("VmHWM_KB", hwm, flush=True)
"""


def run_measured(args: list[str], env: dict) -> dict:
    """Run ``python -m MODULE ARGS`` (args[0] a module) or ``-c CODE ARGS``; its peak RSS and wall time."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or "VmHWM_KB" not in proc.stdout:
        raise RuntimeError(f"{args[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    head, tail = proc.stdout.rsplit("VmHWM_KB", 1)
    return {"peak_rss_bytes": int(tail.split()[0]) * 1024, "wall_seconds": round(wall, 2), "log_tail": head[-400:]}


def write_checkpoints(folder: Path, layout: str, num_tasks: int) -> list[Path]:
    """pretrained + T fine-tunes as safetensors files (generated once, in a child to keep us small)."""
    paths = [folder / "pretrained.safetensors", *[folder / f"ft_{i}.safetensors" for i in range(num_tasks)]]
    if all(p.exists() for p in paths):
        return paths
    script = ("import sys; from pathlib import Path; from tsv_fast import synthetic; from tsv_fast.io import save_checkpoint\n"
              "pre, fts = synthetic.checkpoints(sys.argv[1], int(sys.argv[2]))\n"
              "folder = Path(sys.argv[3]); save_checkpoint(pre, folder / 'pretrained.safetensors')\n"
              "for i, ft in enumerate(fts): save_checkpoint(ft, folder / f'ft_{i}.safetensors')\n")
    subprocess.run([sys.executable, "-c", script, layout, str(num_tasks), str(folder)], check=True, env=child_env())
    return paths


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env  # tsv_fast comes from the installed package (pip install -e .), never from the clone root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--authors", nargs="+", default=["compute", "load"],
                        help="authors' mode per T (compute | load | skip); the last repeats")
    parser.add_argument("--layout", default="vit-b-32")
    parser.add_argument("--data", type=Path, default=None, help="folder for the checkpoints (default: temporary)")
    parser.add_argument("--max-chunk-size", default="256MB")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    args = parser.parse_args()

    import torch

    from tsv_fast import __version__
    from tsv_fast.io import open_checkpoint

    env = child_env()
    temp = tempfile.TemporaryDirectory(prefix="tsv-bench-mem-") if args.data is None else None
    data = Path(temp.name) if temp else args.data
    data.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "tsv_fast": __version__, "git_sha": _git_sha(),
                           "omp_num_threads": 1},
               "layout": args.layout, "dtype": "float32", "max_chunk_size": args.max_chunk_size, "runs": []}
    baseline = run_measured(["-c", "import torch, safetensors, tsv_fast.cli, tsv_fast.api"], env)
    results["python_torch_baseline_rss_bytes"] = baseline["peak_rss_bytes"]
    for index, num_tasks in enumerate(args.tasks):
        mode = args.authors[min(index, len(args.authors) - 1)]
        folder = data / f"{args.layout}-T{num_tasks}"
        folder.mkdir(exist_ok=True)
        print(f"T={num_tasks}: writing checkpoints to {folder}", flush=True)
        paths = write_checkpoints(folder, args.layout, num_tasks)
        model_bytes = paths[0].stat().st_size
        ours = run_measured(["tsv_fast", "merge", "--base", str(paths[0]), *map(str, paths[1:]),
                             "-o", str(folder / "merged.safetensors"), "--no-progress",
                             "--max-chunk-size", args.max_chunk_size], env)
        ckpt = open_checkpoint(paths[0])
        largest_layer = max(torch.Size(ckpt.shape(k)).numel() * ckpt.dtype(k).itemsize for k in ckpt.keys())
        run = {"num_tasks": num_tasks, "model_bytes": model_bytes, "all_checkpoints_bytes": model_bytes * (num_tasks + 1),
               "largest_layer_bytes": largest_layer, "ours": ours}
        print(f"  ours: peak {ours['peak_rss_bytes'] / 2**20:.0f} MiB, {ours['wall_seconds']:.0f} s", flush=True)
        if mode != "skip":
            authors = run_measured(["-c", AUTHORS_SCRIPT, mode, *map(str, paths)], env)
            authors["mode"] = mode
            run["authors"] = authors
            run["ours_over_authors_peak"] = round(ours["peak_rss_bytes"] / authors["peak_rss_bytes"], 4)
            print(f"  authors ({mode}): peak {authors['peak_rss_bytes'] / 2**20:.0f} MiB, "
                  f"{authors['wall_seconds']:.0f} s; ratio {run['ours_over_authors_peak']:.1%}", flush=True)
        results["runs"].append(run)
        (folder / "merged.safetensors").unlink(missing_ok=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))  # after every T, so partial runs keep results
    print(f"results in {args.out}")
    if temp:
        temp.cleanup()


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
