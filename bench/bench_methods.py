"""Cost and accuracy of every merge method of the engine, beside its authors' route, in one run.

For each method (tsv-m, iso-c, iso-cts) and workload (layout, T):
    ours      tsv_fast.merge(None, task_vectors, method=...)   (the Gram route, streamed)
    authors   the method as its authors' code computes it: full float32 SVDs
              (reference.authors_fast_tsv_merge for TSV-M, reference.iso_c / iso_cts in float32)
timed interleaved (median of --runs), and per matrix the relative Frobenius error against the
method's float64 twin (reference.*, float64), with the accuracy contract max(1e-5, 3 × authors' error).

    OMP_NUM_THREADS=1 python bench/bench_methods.py                       # ViT-B/32 block 0, T = 8 and 20
    python bench/bench_methods.py --render                                # README table from results/

Writes bench/results/methods_<device>_<date>.json. The task vectors are those of bench_merge.py:
full-rank synthetic deltas with a decaying spectrum sharing 30 % of their subspace.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402  (workloads, machine info)

import tsv_fast  # noqa: E402
from tsv_fast import reference  # noqa: E402

RESULTS = HERE / "results"
README_BEGIN, README_END = "<!-- bench_methods:begin -->", "<!-- bench_methods:end -->"
METHODS = {
    "tsv-m": (lambda tvs: reference.authors_fast_tsv_merge(tvs),
              lambda tvs: reference.fast_tsv_merge(tvs, compute_dtype=torch.float64)),
    "iso-c": (lambda tvs: reference.iso_c(tvs), lambda tvs: reference.iso_c(tvs, compute_dtype=torch.float64)),
    "iso-cts": (lambda tvs: reference.iso_cts(tvs), lambda tvs: reference.iso_cts(tvs, compute_dtype=torch.float64)),
}


def run(layout: str, num_tasks: int, blocks: int, runs: int, methods: list[str], log=print) -> list[dict]:
    shapes = bench_merge.select_layout(layout, blocks)
    tvs, representative = bench_merge.make_task_vectors(layout, num_tasks, shapes)
    unique = list(dict.fromkeys(k for k, s in shapes.items() if bench_merge.is_matrix(k, s)
                                and representative[k] == k))
    tvs = bench_merge.subset(tvs, unique)  # one matrix per shape: same-shape copies add nothing here
    rows = []
    for method in methods:
        authors_fn, oracle_fn = METHODS[method]
        started = time.perf_counter()
        oracle = oracle_fn(tvs)
        log(f"[{layout} T={num_tasks} {method}] float64 twin in {time.perf_counter() - started:.1f} s")
        fns = {"authors": authors_fn, "ours": lambda tvs, m=method: tsv_fast.merge(None, tvs, method=m)}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        outputs = {}
        for _ in range(runs):  # interleaved, so that load drift biases neither
            for name, fn in fns.items():
                outputs[name] = None
                start = time.perf_counter()
                outputs[name] = fn(tvs)
                samples[name].append(time.perf_counter() - start)
        errors = {name: {key: bench_merge.rel_f(out[key], oracle[key]) for key in unique} for name, out in outputs.items()}
        for name in fns:
            worst = max(unique, key=lambda key: errors[name][key])
            bounds = {key: max(1e-5, 3 * errors["authors"][key]) for key in unique}
            rows.append({"layout": layout, "blocks": blocks, "matrices": len(unique), "T": num_tasks, "method": method,
                         "provider": name, "time_median_s": statistics.median(samples[name]), "samples_s": samples[name],
                         "ratio_vs_authors": statistics.median(samples["authors"]) / statistics.median(samples[name]),
                         "worst_key": worst, "rel_err": errors[name][worst],
                         "authors_rel_err": errors["authors"][worst],
                         "contract_ok": all(errors[name][key] <= bounds[key] for key in unique)})
            log(f"  {method:<8} {name:<8} {rows[-1]['time_median_s']:8.2f} s  x{rows[-1]['ratio_vs_authors']:5.2f}  "
                f"err {rows[-1]['rel_err']:.1e} (authors {rows[-1]['authors_rel_err']:.1e}) "
                f"contract {'ok' if rows[-1]['contract_ok'] else 'FAIL'}")
    return rows


def render(paths: list[Path]) -> str:
    lines = ["| workload | T | method | provider | median (s) | runs | vs authors | max rel_F vs fp64 twin (authors) "
             "| contract |", "|---|---|---|---|---|---|---|---|---|"]
    sources = []
    for path in paths:
        data = json.loads(path.read_text())
        for r in data["rows"]:
            lines.append(f"| {r['layout']} block 0 ({r['matrices']} matrices) | {r['T']} | {r['method']} | "
                         f"{r['provider']} | {r['time_median_s']:.3g} | {len(r['samples_s'])} | "
                         f"{r['ratio_vs_authors']:.1f}x | {r['rel_err']:.1e} ({r['authors_rel_err']:.1e}) | "
                         f"{'ok' if r['contract_ok'] else 'FAIL'} |")
        meta = data["meta"]
        sources.append(f"- `{meta['command']}` -> `{path.name}` ({meta['device_name']}, torch {meta['torch']}, "
                       f"{meta['timestamp']}, git {meta['git_sha'][:10]}, OMP_NUM_THREADS={meta['omp_threads']})")
    return "\n".join(lines + ["", "Generated by `python bench/bench_methods.py --render` from:", *sources])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="vit-b-32")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", action="store_true", help="print the README table of bench/results/methods_*.json")
    parser.add_argument("--readme", type=Path, default=None, help="with --render: replace the table in this README")
    args = parser.parse_args(argv)
    if args.render:
        table = render(sorted(RESULTS.glob("methods_*.json")))
        if args.readme:
            text = args.readme.read_text()
            start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
            args.readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        print(table)
        return
    rows = [row for t in args.tasks for row in run(args.layout, t, args.blocks, args.runs, args.methods)]
    device = torch.device("cpu")
    meta = {"command": "python bench/bench_methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device_name": bench_merge.device_name(device), "torch": torch.__version__, "git_sha": bench_merge.git_sha(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", ""), "torch_threads": torch.get_num_threads()}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    out = args.out or RESULTS / f"methods_cpu_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
