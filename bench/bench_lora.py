"""TSV-M of T LoRA adapters: the factor route (tsv_fast.lora_tsv_merge) against dense routes, one run.

Workload: the matrices of one LLaMA-7B decoder layer (tsv_fast.synthetic layout "llama-7b-layer",
float32 base weights) and T random rank-r adapters of all seven projections (PEFT layout, α = 2r).
Providers, float32 in and out:

    lora     tsv_fast.lora_tsv_merge: SVDs from the factors, stacks Σ rᵢ wide
    dense    tsv_fast.tsv_merge on the dense fine-tunes (W + s·B A per task), as after merge_and_unload
    authors  tsv_fast.reference.authors_fast_tsv_merge on the dense task vectors (full SVDs)

The dense providers take minutes per 4096² matrix on a CPU, so they run on the keys matching
--dense-keys (default: q_proj) and `lora` is timed on those keys too (the same-work ratio) and on
the whole layer. Forming the dense inputs is not timed. Each row: median of --runs (dense and
authors: --dense-runs), the relative Frobenius difference against `dense`, and the floor of the
LoRA route: max(bytes of base + output / copy bandwidth, reconstruction GEMM FLOPs / fp32 rate),
both measured in the same run.

    OMP_NUM_THREADS=1 python bench/bench_lora.py                  # CPU, ~10 min
    python bench/bench_lora.py --device cuda --dense-runs 3
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing  # noqa: E402
from bench_merge import environment  # noqa: E402

import tsv_fast  # noqa: E402
from tsv_fast import lora_tsv_merge, reference, synthetic  # noqa: E402
from tsv_fast.io import peft as lora  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def make_workload(num_tasks: int, rank: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = synthetic.layout("llama-7b-layer")
    base = {k: (0.02 * torch.randn(s, generator=g)).to(device) for k, s in shapes.items()}
    adapters = []
    for t in range(num_tasks):
        ad = lora.LoraAdapter(f"adapter {t}")
        for key, shape in shapes.items():
            if len(shape) == 2:
                b = 0.01 * torch.randn(shape[0], rank, generator=g)
                a = torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5
                ad.factors[key] = lora.LoraFactor(b.to(device), a.to(device), 2.0, False)
        adapters.append(ad)
    return base, adapters


def rel_f(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm((x - y).double()) / torch.linalg.norm(y.double()).clamp_min(1e-300))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dense-keys", default=r"q_proj", help="regex of the keys the dense providers run on")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dense-runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/lora_<device>_<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = _timing.measure_machine(device)
    env = environment(device, f"llama-7b-layer T={args.tasks} r={args.rank}", " ".join(sys.argv))
    base, adapters = make_workload(args.tasks, args.rank, device)
    subset = [k for k in base if re.search(args.dense_keys, k) and base[k].dim() == 2]
    base_sub = {k: base[k] for k in subset}
    adapters_sub = [lora.LoraAdapter(a.name, {k: a.factors[k] for k in subset}) for a in adapters]
    task_vectors = [{k: a.factors[k].dense() for k in subset} for a in adapters]
    finetuned = [{k: base[k] + tv[k] for k in subset} for tv in task_vectors]

    rows, outputs = [], {}

    def run(name, keys, fn, runs):
        def keep():  # the output of the last timed run is the one checked
            outputs[(name, keys)] = fn()

        stats = _timing.time_call(keep, device, runs=runs, warmup=0)
        rows.append({"provider": name, "keys": keys, "runs": runs, **stats})
        print(f"{name:8s} {keys:14s} median {stats['median_s']:8.3f} s over {runs} run(s)", flush=True)

    run("lora", "whole layer", lambda: lora_tsv_merge(base, adapters), args.runs)
    run("lora", args.dense_keys, lambda: lora_tsv_merge(base_sub, adapters_sub), args.runs)
    run("dense", args.dense_keys, lambda: tsv_fast.tsv_merge(base_sub, finetuned), args.dense_runs)
    run("authors", args.dense_keys, lambda: {k: base_sub[k] + v for k, v in
                                             reference.authors_fast_tsv_merge(task_vectors).items()}, args.dense_runs)

    dense = outputs[("dense", args.dense_keys)]
    authors_time = next(r["median_s"] for r in rows if r["provider"] == "authors")
    matrices = [k for k in base if base[k].dim() == 2]
    for row in rows:
        keys = matrices if row["keys"] == "whole layer" else subset
        out = outputs[(row["provider"], row["keys"])]
        # the task-vector part, W - W_pre: the base dominates the full weights
        row["rel_diff_vs_dense"] = None if row["keys"] == "whole layer" else max(
            rel_f(out[k] - base[k], dense[k] - base[k]) for k in subset)
        row["ratio_vs_authors"] = None if row["keys"] == "whole layer" else authors_time / row["median_s"]
        flops = sum(2 * base[k].shape[0] * base[k].shape[1] * args.tasks * args.rank for k in keys)
        nbytes = sum(2 * base[k].numel() * base[k].element_size() for k in keys)
        row["floor_s"] = max(nbytes / machine["bandwidth_Bps"], flops / machine["gemm_fp32_flops"])
        print(f"{row['provider']:8s} {row['keys']:14s} {row['median_s']:8.3f} s  floor {row['floor_s']:.3f} s"
              + (f"  x{row['ratio_vs_authors']:.1f} vs authors  rel diff vs dense {row['rel_diff_vs_dense']:.2e}"
                 if row["ratio_vs_authors"] else ""))
    out_path = args.out or RESULTS / f"lora_{device.type}_{env['timestamp'][:10].replace('-', '')}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": {**env, **machine, "tasks": args.tasks, "rank": args.rank},
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
