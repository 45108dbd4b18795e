"""Factored task vectors in and out (#17), one run, results as JSON in bench/results/.

A. Merged LoRA adapter out vs full model out: the matrices of one LLaMA-7B decoder layer
   (synthetic layout "llama-7b-layer", float32 base) and T random rank-r adapters of all seven
   projections (bench_lora.make_workload). Providers, each written to disk (the time includes it):

       adapter        lora_tsv_merge(..., output="adapter").save(folder): the merged update as lora_A / lora_B
       adapter-R      the same with max_rank=R (--max-rank): each module's top R triplets, energy kept
       full           lora_tsv_merge(..., sink=SafetensorsSink(file)): merged weights W_pre + M

   Rows: median time, bytes written, the update's rank, and the relative difference of each
   module's update (B A against W_full − W_pre; the largest over the modules).

B. Merging from a TSV-C library vs from the full checkpoints: synthetic ViT-B/32 fine-tunes (full-rank
   task vectors, synthetic.checkpoints(delta_rank=None); --delta-rank for low-rank ones; --blocks of
   the 12 blocks) saved as safetensors, 8 tasks
   compressed into a library (k = r/8 or --library-fraction, not timed), then tasks --merge-tasks
   (default 0,2,5,7) merged with TSV-M:

       library        merge_compressed(base, library, tasks=...): k = min(stored k, the rule's r/4)
       checkpoints    tsv_merge(base, those fine-tunes): k = r/4, reading the full checkpoints
       checkpoints-k  the same at the library's rank fraction: what the library must equal (TSV-M
                      depends on k, so `library` equals `checkpoints` only where the stored k suffices)

   Rows: median time, bytes read (tensor bytes of base, fine-tunes or library), the largest relative
   difference of W − W_pre against `checkpoints` and against `checkpoints-k`.

    OMP_NUM_THREADS=1 python bench/bench_factored.py                       # the full run (CPU, ~30 min)
    OMP_NUM_THREADS=1 python bench/bench_factored.py --blocks 1 --runs 1   # a short check (~3 min)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing  # noqa: E402
from bench_lora import make_workload  # noqa: E402
from bench_merge import environment, select_layout  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import tsv_fast  # noqa: E402
from tsv_fast import io, synthetic  # noqa: E402
from tsv_fast.io.checkpoint import Checkpoint  # noqa: E402

RESULTS = ROOT / "bench" / "results"


class Counting(Checkpoint):
    """A checkpoint that counts the tensor bytes read from it."""

    def __init__(self, inner: Checkpoint):
        self.inner, self.name, self.bytes_read = inner, inner.name, 0
        self.files = getattr(inner, "files", [])

    def keys(self):
        return self.inner.keys()

    def shape(self, key):
        return self.inner.shape(key)

    def dtype(self, key):
        return self.inner.dtype(key)

    def load(self, key):
        tensor = self.inner.load(key)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def rel_f(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm((x - y).double()) / torch.linalg.norm(y.double()).clamp_min(1e-300))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def timed(fn, device, runs):
    keep = {}

    def call():
        keep["out"] = fn()

    stats = _timing.time_call(call, device, runs=runs, warmup=0)
    return stats, keep["out"]


def adapter_rows(args, device, work: Path) -> list[dict]:
    base, adapters = make_workload(args.tasks, args.rank, device)
    rows = []

    def adapter_out(max_rank):
        target = work / f"adapter-{max_rank}"
        merged = tsv_fast.lora_tsv_merge(base, adapters, output="adapter", max_rank=max_rank)
        merged.save(target)
        return merged, target

    def full_out():
        target = work / "full.safetensors"
        tsv_fast.lora_tsv_merge(base, adapters, sink=io.SafetensorsSink(target))
        return target

    stats, full_path = timed(full_out, device, args.runs)
    full = io.open_checkpoint(full_path)
    rows.append({"part": "A", "provider": "full", "runs": args.runs, **stats, "bytes_written": folder_bytes(full_path)})
    for max_rank in (None, args.max_rank):
        stats, (merged, target) = timed(lambda: adapter_out(max_rank), device, args.runs)
        diffs = {}
        for module, rank in merged.ranks.items():
            key = module + ".weight"
            prefix = f"base_model.model.{module}."
            update = merged.tensors[prefix + "lora_B.weight"].double() @ merged.tensors[prefix + "lora_A.weight"].double()
            diffs[key] = rel_f(update, full.load(key).double() - base[key].double())
        rows.append({"part": "A", "provider": "adapter" if max_rank is None else f"adapter-{max_rank}",
                     "runs": args.runs, **stats, "bytes_written": folder_bytes(target),
                     "rank_max": max(merged.ranks.values()), "energy_kept": float(merged.metadata["energy_kept"]),
                     "energy_kept_min": min(merged.energy.values()),
                     "rel_diff_vs_full_max": max(diffs.values())})
    full_row = rows[0]
    for row in rows:
        row["time_vs_full"] = row["median_s"] / full_row["median_s"]
        row["bytes_vs_full"] = row["bytes_written"] / full_row["bytes_written"]
        print(f"A {row['provider']:12s} {row['median_s']:8.3f} s  {row['bytes_written'] / 2**20:9.1f} MiB"
              + (f"  rank {row['rank_max']}  energy {100 * row['energy_kept']:.3f}%  diff vs full "
                 f"{row['rel_diff_vs_full_max']:.1e}" if "rank_max" in row else ""), flush=True)
    return rows


def library_rows(args, device, work: Path) -> list[dict]:
    shapes = select_layout("vit-b-32", args.blocks)
    private = "_bench_factored"
    synthetic.LAYOUTS[private] = lambda: dict(shapes)
    try:
        pre, fts = synthetic.checkpoints(private, 8, delta_rank=args.delta_rank)
    finally:
        del synthetic.LAYOUTS[private]
    save_file(pre, str(work / "pre.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        save_file(ft, str(work / f"ft{i}.safetensors"))
        paths.append(work / f"ft{i}.safetensors")
    del fts
    started = time.perf_counter()
    library = work / "tasks.tsvc"
    io.save_compressed(library, tsv_fast.compress(work / "pre.safetensors", paths, rank_fraction=args.library_fraction))
    compress_s = time.perf_counter() - started
    chosen = [int(t) for t in args.merge_tasks.split(",")]
    counters = {}

    def from_library():
        lib = io.TsvcLibrary(library)
        base = Counting(io.open_checkpoint(work / "pre.safetensors"))
        out = tsv_fast.merge_compressed(base, lib, tasks=chosen)
        counters["library"] = base.bytes_read + lib.bytes_read
        return out

    def from_checkpoints(name, **options):
        def fn():
            opened = [Counting(io.open_checkpoint(p)) for p in [work / "pre.safetensors", *[paths[t] for t in chosen]]]
            out = tsv_fast.tsv_merge(opened[0], opened[1:], **options)
            counters[name] = sum(c.bytes_read for c in opened)
            return out
        return fn

    outputs, rows = {}, []
    for name, fn in (("library", from_library), ("checkpoints", from_checkpoints("checkpoints")),
                     ("checkpoints-k", from_checkpoints("checkpoints-k", rank_fraction=args.library_fraction or 1 / 8))):
        stats, outputs[name] = timed(fn, device, args.runs)
        rows.append({"part": "B", "provider": name, "runs": args.runs, **stats, "bytes_read": counters[name]})
    for row in rows:
        out = outputs[row["provider"]]
        for basis in ("checkpoints", "checkpoints-k"):
            want = outputs[basis]
            row[f"rel_diff_vs_{basis}_max"] = max(rel_f(out[k] - pre[k], want[k] - pre[k]) for k in pre
                                                  if not torch.equal(want[k], pre[k]))
        row["time_vs_checkpoints"] = row["median_s"] / rows[1]["median_s"]
        row["bytes_vs_checkpoints"] = row["bytes_read"] / rows[1]["bytes_read"]
        print(f"B {row['provider']:14s} {row['median_s']:8.3f} s  read {row['bytes_read'] / 2**20:8.1f} MiB  "
              f"diff vs checkpoints {row['rel_diff_vs_checkpoints_max']:.1e}, vs checkpoints-k "
              f"{row['rel_diff_vs_checkpoints-k_max']:.1e}", flush=True)
    rows.append({"part": "B", "provider": "compress (library, not timed above)", "seconds": compress_s,
                 "library_bytes": library.stat().st_size, "checkpoint_bytes": (work / "pre.safetensors").stat().st_size})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8, help="A: adapters")
    parser.add_argument("--rank", type=int, default=16, help="A: adapter rank")
    parser.add_argument("--max-rank", type=int, default=64, help="A: the truncated adapter's rank")
    parser.add_argument("--blocks", type=int, default=None, help="B: first N ViT-B/32 blocks (default all 12)")
    parser.add_argument("--merge-tasks", default="0,2,5,7", help="B: stored tasks merged from the library")
    parser.add_argument("--library-fraction", type=float, default=None,
                        help="B: the library's rank fraction (default 1/8; 0.25 stores what a merge of 4 needs)")
    parser.add_argument("--delta-rank", type=int, default=None,
                        help="B: rank of the synthetic task vectors (default full rank; 64 makes the stored r/8 suffice)")
    parser.add_argument("--parts", default="AB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default a temporary one)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/factored_<device>_<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = _timing.measure_machine(device)
    env = environment(device, f"A: llama-7b-layer T={args.tasks} r={args.rank}; B: vit-b-32 blocks={args.blocks or 12} "
                              f"tasks {args.merge_tasks} of 8, library fraction {args.library_fraction or '1/8'}, "
                              f"delta rank {args.delta_rank or 'full'}", " ".join(sys.argv))
    work = Path(tempfile.mkdtemp(prefix="bench-factored-", dir=args.work))
    rows = []
    try:
        if "A" in args.parts:
            rows += adapter_rows(args, device, work)
        if "B" in args.parts:
            rows += library_rows(args, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out_path = args.out or RESULTS / f"factored_{device.type}_{env['timestamp'][:10].replace('-', '')}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": {**env, **machine, "tasks": args.tasks, "rank": args.rank,
                                             "blocks": args.blocks or 12}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
