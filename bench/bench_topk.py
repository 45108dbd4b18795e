"""Per-task top-k: the authors' full SVD, the Gram route and the certified Krylov route, per shape
and thread count; whole TSV-M merges with each route (bench_merge's harness); real task vectors.

Task matrices have bench_merge's spectrum (synthetic.checkpoints, full rank, decaying, 30 % shared).
Every row is timed in the same run as its `authors` row, at the same torch thread count (median of
--runs, providers interleaved). Per-task floors come from counted FLOPs over GEMM rates measured in
the same run at the same shape and thread count (the eigensolvers are not GEMMs: not in the floor):
  gram    fp64: m n² (dsyrk) + 2 m n k (ΔV)
  krylov  fp32: 2 m n b (2q) (q steps of Y = ΔQ and Z = ΔᵀY); fp64: 4 m n k (certificate) +
          2 m s k (ΔṼ = YW) + m b² q(q+1) (G = YᵀY) + 4 n b² q(q+1) (Gram–Schmidt twice), s = q b
Accuracy against the float64 SVD of the same float32 Δ: rank-k reconstruction error and the largest
true residual max(‖ΔV−Uσ‖, ‖ΔᵀU−Vσ‖) in units of u₃₂‖Δ‖_F (the certificate's bound is 2).

    python bench/bench_topk.py                 # the issue-18 suite (ViT-B/32 shapes + merges, 1 and 2 threads)
    python bench/bench_topk.py --quick         # op rows at 1 thread, one run: a smoke test
    python bench/bench_topk.py --llama         # LLaMA-7B layer shapes at T = 4 (slow)
    python bench/bench_topk.py --real /work/cache/tsv_acc   # MiniLM fine-tunes: accuracy per matrix
    python bench/bench_topk.py --classes 3072x768:8 --threads 1   # per spectrum class of the tests
    python bench/bench_topk.py --render bench/results/topk_*.json
Writes bench/results/topk_<device>_<date>_<label>.json and the rendered table next to it (.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # scipy's OpenBLAS single-threaded; torch threads are set per row

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402
from tsv_fast import reference, synthetic  # noqa: E402
from tsv_fast.backends import krylov  # noqa: E402
from tsv_fast.backends import torch_backend  # noqa: E402
from tsv_fast.backends.torch_backend import TorchBackend  # noqa: E402

F64 = torch.float64
VIT = [("vit-b32 c_fc", (3072, 768)), ("vit-b32 in_proj", (2304, 768)), ("vit-b32 out_proj", (768, 768)),
       ("vit-b32 c_proj", (768, 3072))]
LLAMA = [("llama7b q_proj", (4096, 4096)), ("llama7b up_proj", (11008, 4096))]
MERGES = [("vit-b-32", 8, 1), ("vit-b-32", 20, 1), ("vit-b-32", 8, None), ("vit-b-32", 20, None)]
DEVICE = torch.device("cpu")  # --device
# --classes: label -> (synthetic spectrum kind, task_matrices options, rank-k truncation defined)
# (fast decay floors σ at 1e-4 from j = 42 on: a tie at any k beyond, so its truncation is not defined)
CLASSES = {"decay 0.97^j": ("decay", {}, True), "fast decay 0.8^j": ("fast_decay", {}, False),
           "flat (slowest)": ("flat", {}, False), "clustered at k": ("clustered", {}, False),
           "90 % shared": ("decay", {"shared": 0.9}, True), "rank k/2": ("decay", {"rank": "k/2"}, True),
           "identical tasks": ("identical", {}, True), "one zero task": ("decay", {"zero": True}, True)}


def _sync() -> None:
    bench_merge._timing.synchronize(DEVICE)


def task_deltas(shape, num_tasks, seed=0) -> torch.Tensor:
    tvs, _ = bench_merge.make_task_vectors(f"op{shape}", num_tasks, {"w": shape}, seed=seed)
    return torch.stack([tv["w"] for tv in tvs]).to(DEVICE)


def providers(k: int):
    def route(name):
        backend = TorchBackend()
        backend.topk = name
        return lambda d: backend.task_factors(d[None], None, k)

    def authors(d):  # their code: one full float32 SVD per task, top k kept
        out = [torch.linalg.svd(x, full_matrices=False) for x in d]
        return (torch.stack([u[:, :k] for u, _, _ in out])[None], torch.stack([s[:k] for _, s, _ in out])[None],
                torch.stack([vh[:k].mT for _, _, vh in out])[None])
    return {"authors": authors, "gram": route("gram"), "krylov": route("krylov")}


def gemm_rates(m: int, n: int, b: int) -> dict:
    """fp32 and fp64 GEMM FLOP/s of [m, n] @ [n, b] and fp64 of the Gram [n, m] @ [m, n], measured now."""
    out = {}
    for name, dtype, cols in (("fp32", torch.float32, b), ("fp64", F64, b), ("fp64_gram", F64, n)):
        a = torch.randn(m, n, dtype=dtype, device=DEVICE)
        x = torch.randn(n if name != "fp64_gram" else m, cols, dtype=dtype, device=DEVICE)
        fn = (lambda: a @ x) if name != "fp64_gram" else (lambda: a.mT @ x)
        with krylov.ieee_fp32(DEVICE):
            fn()
            samples = []
            for _ in range(3):
                _sync()
                start = time.perf_counter()
                fn()
                _sync()
                samples.append(time.perf_counter() - start)
        out[name] = 2 * m * n * cols / min(samples)
    return out


def floors(m: int, n: int, k: int, steps: float, rates: dict) -> dict:
    """Per-task GEMM floors (seconds) of the two routes (see the module docstring)."""
    b = krylov.block_size(k, n)
    q = steps or 0.0
    s = q * b
    krylov32 = 2 * m * n * b * 2 * q
    krylov64 = 4 * m * n * k + 2 * m * s * k + m * b * b * q * (q + 1) + 4 * n * b * b * q * (q + 1)
    return {"gram": (m * n * n + 2 * m * n * k) / rates["fp64_gram"],
            "krylov": krylov32 / rates["fp32"] + krylov64 / rates["fp64"] if q else math.nan}


def accuracy(delta: torch.Tensor, factors, want) -> dict:
    u, s, v = (t[0].to(F64).cpu() for t in factors)
    d = delta.double().cpu()
    unit = krylov.U32 * torch.linalg.vector_norm(d, dim=(-2, -1))
    residual = torch.maximum(torch.linalg.vector_norm(d @ v - u * s.unsqueeze(-2), dim=-2).amax(-1),
                             torch.linalg.vector_norm(d.mT @ u - v * s.unsqueeze(-2), dim=-2).amax(-1))
    tiny = torch.finfo(F64).tiny  # a zero task: its factors must give zero residual and reconstruction
    out = {"resid_u32F": float((residual / unit.clamp_min(tiny)).max())}
    if want is not None:
        rebuild = lambda a, b, c: (a * b.unsqueeze(-2)) @ c.mT  # noqa: E731
        ref = rebuild(*want)
        out["rec_err"] = float((torch.linalg.vector_norm(rebuild(u, s, v) - ref, dim=(-2, -1))
                                / torch.linalg.vector_norm(ref, dim=(-2, -1)).clamp_min(tiny)).max())
    return out


def class_deltas(shape, num_tasks, label: str) -> tuple[torch.Tensor, bool]:
    """Task matrices of one spectrum class of the tests (DESIGN.md §5), float32, and whether their
    rank-k truncation is defined (no tie at k), so that a reconstruction error means something."""
    k = reference.rank_per_task(shape, num_tasks)
    kind, options, defined = CLASSES[label]
    if kind == "identical":
        delta = synthetic.task_matrices(shape, 1, seed=3).expand(num_tasks, *shape)
    else:
        delta = synthetic.task_matrices(shape, num_tasks, kind=kind, seed=3, **{
            key: (k // 2 if value == "k/2" else value) for key, value in options.items() if key != "zero"})
        if options.get("zero"):
            delta[1] = 0
    return delta.float().contiguous().to(DEVICE), defined


def op_rows(name, shape, num_tasks, threads, runs, log=print, delta=None, defined=True) -> list[dict]:
    m, n = shape
    k = reference.rank_per_task(shape, num_tasks)
    delta = task_deltas(shape, num_tasks) if delta is None else delta
    want = reference.topk_svd_ref(delta.double().cpu(), k) if defined and m * n <= 4_000_000 else None
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        rates = gemm_rates(max(m, n), min(m, n), krylov.block_size(k, min(m, n)))
        fns = providers(k)
        samples, cpu = {p: [] for p in fns}, {p: [] for p in fns}
        outputs, stats = {}, {}
        for p, fn in fns.items():  # warm-up, and the output whose accuracy is reported
            krylov.STATS.clear()
            outputs[p] = fn(delta)
            stats[p] = dict(krylov.STATS)
        for _ in range(runs):
            for p, fn in fns.items():
                _sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(delta)
                _sync()
                samples[p].append(time.perf_counter() - start)
                cpu[p].append(time.process_time() - start_cpu)
        steps = stats["krylov"]
        mean_steps = sum(int(key[6:]) * c for key, c in steps.items() if key.startswith("steps=")) / max(1, steps.get("tasks", 0))
        floor = floors(max(m, n), min(m, n), k, mean_steps, rates)
        base = {p: statistics.median(v) for p, v in samples.items()}
        for p in fns:
            row = {"kind": "op", "name": name, "shape": list(shape), "T": num_tasks, "k": k, "threads": count,
                   "provider": p, "median_s": base[p], "per_task_ms": 1e3 * base[p] / num_tasks,
                   "samples_s": samples[p], "vs_authors": base["authors"] / base[p], "vs_gram": base["gram"] / base[p],
                   "cpu_per_task_ms": 1e3 * statistics.median(cpu[p]) / num_tasks,  # CPU-seconds: all threads
                   "floor_ms": 1e3 * floor.get(p, math.nan), "rates_GFLOPs": {r: v / 1e9 for r, v in rates.items()},
                   **accuracy(delta, outputs[p], want)}
            if p == "krylov":
                row.update(block=krylov.block_size(k, min(m, n)), mean_steps=mean_steps,
                           steps={key: c for key, c in steps.items() if key.startswith("steps=")},
                           fallback=steps.get("fallback", 0))
            rows.append(row)
            log(format_op(row))
    return rows


def merge_rows(workloads, threads, runs, log=print) -> list[dict]:
    rows = []
    device = DEVICE
    for count in threads:
        torch.set_num_threads(count)
        machine = bench_merge._timing.measure_machine(device)
        env = bench_merge.environment(device, "topk", " ".join(sys.argv))
        for name, num_tasks, blocks in workloads:
            krylov.STATS.clear()
            got = bench_merge.run_workload(name, num_tasks, device, providers=["authors", "torch-gram", "torch-krylov"],
                                           runs=runs, warmup=0, blocks=blocks,
                                           authors_blocks=None if blocks else 1, machine=machine, env=env, log=log)
            stats = dict(krylov.STATS)
            for row in got:
                row.update(kind="merge", threads=count)
                if row["provider"] == "torch-krylov":
                    row["krylov_stats_per_run"] = {key: value / (runs + (row["ratio_basis"] != "same workload"))
                                                   for key, value in stats.items()}
            rows += got
    return rows


def real_rows(folder: Path, counts, log=print) -> list[dict]:
    """TSV-M of real MiniLM task vectors (bench/accuracy's cache) with each route vs float64 and the authors."""
    import importlib.util

    from safetensors.torch import load_file

    import tsv_fast

    spec = importlib.util.spec_from_file_location("tsv_accuracy_run", HERE / "accuracy" / "run.py")
    acc = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = acc  # its dataclasses look themselves up there
    spec.loader.exec_module(acc)
    pre = acc.encoder_state(acc.load_model()[1])
    newest = {}  # one seed-0 fine-tune per task (the cache may hold several configs): the newest file
    for path in sorted(folder.glob("*_seed0_*.safetensors"), key=lambda p: p.stat().st_mtime):
        newest[path.name.split("_seed")[0]] = path
    files = sorted(newest.values())
    log(f"real MiniLM task vectors: {[f.name for f in files]}")
    rows = [{"kind": "real-files", "files": [f.name for f in files]}]
    for count in counts:
        fts = [{k: v for k, v in load_file(f).items() if k in pre} for f in files[:count]]
        keys = [k for k in pre if pre[k].ndim == 2]
        exact = [{k: ft[k].double() - pre[k].double() for k in keys} for ft in fts]
        tvs32 = [{k: ft[k] - pre[k] for k in keys} for ft in fts]
        oracle = reference.fast_tsv_merge(exact, compute_dtype=F64)
        authors = reference.authors_fast_tsv_merge(tvs32)
        for route in ("gram", "krylov", "krylov-full-budget"):
            # krylov-full-budget: a Krylov space up to min(m, n) minus a block, to see what real spectra need
            saved = dict(torch_backend.KRYLOV_BUDGET)
            torch_backend.KRYLOV_BUDGET[DEVICE.type] = 1.0 if route == "krylov-full-budget" else saved[DEVICE.type]
            krylov.STATS.clear()
            try:
                got = bench_merge._with_topk_route(route.split("-")[0],
                                                   lambda: tsv_fast.fast_tsv_merge(tvs32, device=DEVICE))
            finally:
                torch_backend.KRYLOV_BUDGET.update(saved)
            stats = dict(krylov.STATS)
            for key in keys:
                err, base = bench_merge.rel_f(got[key], oracle[key]), bench_merge.rel_f(authors[key], oracle[key])
                rows.append({"kind": "real", "T": count, "route": route, "key": key, "shape": list(pre[key].shape),
                             "rel_err": err, "authors_rel_err": base,
                             "contract_ok": err <= max(1e-5, 3 * base), "krylov_stats": stats})
            group = [r for r in rows if r.get("T") == count and r.get("route") == route]
            worst = max(group, key=lambda r: r["rel_err"] / max(1e-5, 3 * r["authors_rel_err"]))
            log(f"real MiniLM T={count} {route}: worst {worst['key']} err {worst['rel_err']:.2e} (authors "
                f"{worst['authors_rel_err']:.2e}); contract ok on {sum(r['contract_ok'] for r in group)}/{len(keys)}; {stats}")
    return rows


def format_op(row) -> str:
    extra = (f"  b={row['block']} steps {row['mean_steps']:.1f} fallback {row['fallback']}"
             if row["provider"] == "krylov" else "")
    rec = f"{row['rec_err']:.1e}" if "rec_err" in row else "n/a"
    return (f"{row['name']:<17} {row['shape'][0]}x{row['shape'][1]:<5} T={row['T']:<3} k={row['k']:<4} thr={row['threads']} "
            f"{row['provider']:<8} {row['per_task_ms']:8.1f} ms/task (cpu {row['cpu_per_task_ms']:7.1f})  x{row['vs_authors']:5.2f} authors  "
            f"x{row['vs_gram']:5.2f} gram  floor {row['floor_ms']:7.1f} ms  rec {rec}  resid {row['resid_u32F']:.2f}{extra}")


def render(data: dict) -> str:
    lines = [f"Machine: {data['meta']['device_name']}, torch {data['meta']['torch']}, git {data['meta']['git_sha'][:10]}, "
             f"{data['meta']['timestamp']}; {data['meta'].get('note', '')}", ""]
    ops = [r for r in data["rows"] if r["kind"] == "op"]
    if ops:
        lines += ["| matrix | T | k | threads | provider | ms / task | vs authors | vs gram | GEMM floor (ms) | "
                  "time / floor | rank-k rec. err | max residual (u₃₂‖Δ‖_F) | Krylov steps (b) | fallbacks |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ops:
            floor = r["floor_ms"]
            lines.append(f"| {r['name']} {r['shape'][0]}×{r['shape'][1]} | {r['T']} | {r['k']} | {r['threads']} | "
                         f"{r['provider']} | {r['per_task_ms']:.1f} | {r['vs_authors']:.2f}× | {r['vs_gram']:.2f}× | "
                         f"{floor:.1f} | {r['per_task_ms'] / floor if floor == floor else math.nan:.1f} | "
                         f"{r.get('rec_err', math.nan):.1e} | {r['resid_u32F']:.2f} | "
                         + (f"{r['mean_steps']:.1f} ({r['block']}) | {r['fallback']} |" if r["provider"] == "krylov" else "| |"))
        lines.append("")
    merges = [r for r in data["rows"] if r["kind"] == "merge"]
    if merges:
        lines += ["| workload | T | threads | provider | median (s) | vs authors | max rel_F vs fp64 (authors) | "
                  "contract | Krylov steps / fallbacks per run |", "|---|---|---|---|---|---|---|---|---|"]
        for r in merges:
            stats = r.get("krylov_stats_per_run", {})
            mark = "*" if "EXTRAPOLATED" in str(r["ratio_basis"]) else ""
            steps = {key[6:]: round(v) for key, v in stats.items() if key.startswith("steps=")}
            lines.append(f"| {r['workload']} | {r['T']} | {r['threads']} | {r['provider']} | {r['time_median_s']:.3g} | "
                         f"{r['ratio_vs_authors']:.2f}×{mark} | {r['acc_rel_err']:.1e} ({r['acc_authors_rel_err']:.1e}) | "
                         f"{'ok' if r['acc_contract_ok'] else 'FAIL'} | "
                         + (f"steps {steps} / {round(stats.get('fallback', 0))} |" if stats else "|"))
        lines += ["", "\\* authors timed on block 0 only, ratio per-block normalised (EXTRAPOLATED)", ""]
    real = [r for r in data["rows"] if r["kind"] == "real"]
    if real:
        lines += ["| real MiniLM | T | route | matrices within contract | worst rel_F vs fp64 | authors' on that matrix | "
                  "Krylov certified / fallbacks | tasks certified after i steps |", "|---|---|---|---|---|---|---|---|"]
        for (count, route) in dict.fromkeys((r["T"], r["route"]) for r in real):
            group = [r for r in real if r["T"] == count and r["route"] == route]
            worst = max(group, key=lambda r: r["rel_err"])
            stats = group[0]["krylov_stats"]
            lines.append(f"| all-MiniLM-L6-v2 encoder | {count} | {route} | {sum(r['contract_ok'] for r in group)}/{len(group)} | "
                         f"{worst['rel_err']:.1e} ({worst['key']}) | {worst['authors_rel_err']:.1e} | "
                         f"{stats.get('certified', 0)} / {stats.get('fallback', 0)} | "
                         f"{ {key[6:]: v for key, v in sorted(stats.items()) if key.startswith('steps=')} } |")
    lines += ["", f"Command: `{data['meta']['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama", action="store_true", help="LLaMA-7B layer shapes at T = 4 instead")
    parser.add_argument("--real", type=Path, help="folder of cached MiniLM fine-tunes (bench/accuracy/run.py)")
    parser.add_argument("--real-tasks", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-merge", action="store_true", help="op rows only")
    parser.add_argument("--no-ops", action="store_true", help="merge rows only")
    parser.add_argument("--merges", nargs="*", help="NAME:T:BLOCKS (BLOCKS 0 = whole model, authors timed on "
                        "block 0); default vit-b-32 at T = 8, 20, block 0 and whole")
    parser.add_argument("--classes", metavar="MxN:T", help="op rows per spectrum class of the tests at one shape, "
                        "e.g. 3072x768:8")
    parser.add_argument("--label", default="")
    parser.add_argument("--out-dir", type=Path, default=bench_merge.RESULTS, help="where the JSON and .md go")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (threads are then irrelevant)")
    parser.add_argument("--note", default="")
    parser.add_argument("--render", type=Path, nargs="*")
    args = parser.parse_args(argv)
    if args.render:
        for path in args.render:
            print(render(json.loads(path.read_text())))
        return
    global DEVICE
    DEVICE = torch.device(args.device)
    meta = {"device_name": bench_merge.device_name(DEVICE), "torch": torch.__version__,
            "git_sha": bench_merge.git_sha(), "note": args.note, "command": " ".join(["python", "bench/bench_topk.py", *sys.argv[1:]]),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "")}
    rows = []
    if args.real:
        rows += real_rows(args.real, args.real_tasks)
        label = args.label or "minilm-real"
    elif args.classes:
        dims, count = args.classes.lower().split(":")
        shape = tuple(int(x) for x in dims.split("x"))
        for name in CLASSES:
            delta, defined = class_deltas(shape, int(count), name)
            rows += op_rows(name, shape, int(count), args.threads, args.runs, delta=delta, defined=defined)
        label = args.label or f"classes-{dims}-T{count}"
    else:
        threads, runs = ([1], 1) if args.quick else (args.threads, args.runs)
        shapes = [(name, shape, 4) for name, shape in LLAMA] if args.llama else \
            [(name, shape, t) for t in (8, 20) for name, shape in VIT]
        for name, shape, num_tasks in ([] if args.no_ops else shapes):
            rows += op_rows(name, shape, num_tasks, threads, 1 if args.llama else runs)
        merges = [(w.split(":")[0], int(w.split(":")[1]), int(w.split(":")[2]) or None) for w in args.merges] \
            if args.merges else MERGES
        if not (args.quick or args.llama or args.no_merge):
            rows += merge_rows(merges, threads, runs)
        label = args.label or ("llama" if args.llama else "quick" if args.quick else "vitb32")
    data = {"meta": meta, "rows": rows}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    path = args.out_dir / f"topk_{DEVICE.type}_{date}_{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    table = render(data)
    path.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
