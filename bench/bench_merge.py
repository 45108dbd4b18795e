"""End-to-end TSV-M benchmark: the authors' route against ours, on real layer shapes.

Workloads are the layer layouts of the open_clip ViT-B/32, ViT-B/16 and ViT-L/14 visual encoders and
of one LLaMA-7B decoder layer (tsv_fast.synthetic.layout), with T synthetic task vectors of full rank
and a decaying spectrum that share 30 % of their subspace (tsv_fast.synthetic.checkpoints,
delta_rank=None). The task matrices are generated once per unique shape and reused by every key of
that shape (same-shape keys therefore hold identical inputs; the work per key is unchanged).

Providers (float32 in, float32 out):
    authors   tsv_fast.reference.authors_fast_tsv_merge (full SVD per task, zero-padded stacks, two
              Procrustes SVDs): the baseline every ratio is against, measured in the same run
    torch     tsv_fast.fast_tsv_merge(backend="torch")
    torch-gram, torch-krylov   the same with that top-k route forced (TSV_FAST_TOPK; opt-in)
    triton, cusolver   the same with that backend, when tsv_fast.available_backends(device) allows
    exact     tsv_fast.fast_tsv_merge(exact=True): the authors' full-SVD route inside our streaming
              engine (opt-in: --providers torch exact)

Each row: wall time (median of --runs after warm-up, runs interleaved across providers;
CUDA-synchronised), ratio against `authors`,
peak memory (CUDA max_memory_allocated; on CPU the peak-RSS increase: VmHWM after clear_refs), the
worst per-matrix relative Frobenius error against tsv_fast.reference.fast_tsv_merge in float64 with
the authors' float32 error on the same matrix and the accuracy contract of DESIGN.md §2,
rel_F(M, M64) <= max(1e-5, 3 rel_F(M_authors, M64)), and two floors measured in the same run:
bytes of T+1 float32 checkpoints / copy bandwidth, and the FLOPs of our route / GEMM rate.

Usage (CPU: one thread, as every CPU number of this project):
    python bench/bench_merge.py --config small            # CI smoke size, < 1 min
    python bench/bench_merge.py --config cpu --authors-blocks 1
    python bench/bench_merge.py --config full --device cuda
    python bench/bench_merge.py --profile                 # per-stage time of the torch route
    python bench/bench_merge.py --render [--readme README.md]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _timing  # noqa: E402
import tsv_fast  # noqa: E402
from tsv_fast import reference, synthetic  # noqa: E402
from tsv_fast.backends import TorchBackend, available_backends  # noqa: E402

RESULTS = HERE / "results"
README_BEGIN = "<!-- bench_merge:begin -->"
README_END = "<!-- bench_merge:end -->"
EXCLUDE = ("text_projection",)
BLOCK = re.compile(r"\.(?:resblocks|layers)\.(\d+)\.")
CONTRACT_FLOOR = 1e-5
CONTRACT_FACTOR = 3.0

#: name -> workloads (layout, T), optional key filter (regex) and block limit, default runs.
CONFIGS = {
    # ViT-B/32 block 0 attention (in_proj 2304x768, out_proj 768x768 and biases): CI smoke size
    "small": {"workloads": [("vit-b-32", 8)], "blocks": 1, "keys": r"resblocks\.0\.attn\.", "runs": 1,
              "label": "block-0 attention"},
    # the CPU goals: the whole ViT-B/32 visual encoder at T = 8 and T = 20
    "cpu": {"workloads": [("vit-b-32", 8), ("vit-b-32", 20)], "blocks": None, "keys": None, "runs": 3},
    # everything (opt-in, for the GPU)
    "full": {"workloads": [(name, t) for name in ("vit-b-32", "vit-b-16", "vit-l-14", "llama-7b-layer")
                           for t in (8, 14, 20)], "blocks": None, "keys": None, "runs": 5},
}

ROW_FIELDS = [
    "workload", "T", "provider", "device", "device_name", "blocks", "matrices", "params",
    "time_median_s", "time_min_s", "time_max_s", "runs", "warmup",
    "ratio_vs_authors", "ratio_basis", "authors_blocks_timed",
    "peak_mem_bytes", "peak_mem_method", "checkpoint_bytes",
    "acc_worst_key", "acc_rel_err", "acc_authors_rel_err", "acc_contract_ok", "acc_contract_failures",
    "acc_worst_margin",
    "flops_fp64", "flops_fp32", "floor_bandwidth_s", "floor_flops_s", "time_over_floor",
    "bandwidth_GBps", "gemm_fp64_GFLOPs", "gemm_fp32_GFLOPs",
    "torch_version", "git_sha", "timestamp", "omp_threads", "torch_threads", "config", "command",
]


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------
def block_of(key: str) -> int | None:
    match = BLOCK.search(key)
    return int(match.group(1)) if match else None


def select_layout(name: str, blocks: int | None = None, keys: str | None = None) -> dict[str, tuple[int, ...]]:
    """The layout of ``name``, limited to its first ``blocks`` blocks and to keys matching ``keys``."""
    shapes = synthetic.layout(name)
    if blocks is not None:
        shapes = {k: s for k, s in shapes.items() if block_of(k) is None or block_of(k) < blocks}
    if keys is not None:
        shapes = {k: s for k, s in shapes.items() if re.search(keys, k)}
    return shapes


def is_matrix(key: str, shape: Sequence[int]) -> bool:
    return reference.is_merged_as_matrix(key, shape, EXCLUDE)


def make_task_vectors(name: str, num_tasks: int, shapes: Mapping[str, tuple[int, ...]], *, seed: int = 0
                      ) -> tuple[list[dict[str, torch.Tensor]], dict[str, str]]:
    """T float32 task-vector dicts over ``shapes`` and key -> representative key of its shape.

    The matrices come from synthetic.checkpoints(delta_rank=None) run on a layout with one key per
    unique matrix shape (plus every non-matrix key); same-shape keys share that key's tensors.
    """
    representative: dict[str, str] = {}
    first_of_shape: dict[tuple[int, ...], str] = {}
    for key, shape in shapes.items():
        if is_matrix(key, shape):
            representative[key] = first_of_shape.setdefault(tuple(shape), key)
        else:
            representative[key] = key
    unique = {key: shapes[key] for key in dict.fromkeys(representative.values())}
    private = f"_bench_{name}"
    synthetic.LAYOUTS[private] = lambda: dict(unique)  # checkpoints() takes a layout name
    try:
        pre, fts = synthetic.checkpoints(private, num_tasks, seed=seed, delta_rank=None)
    finally:
        del synthetic.LAYOUTS[private]
    reps = [{key: ft[key] - pre[key] for key in unique} for ft in fts]
    del pre, fts
    return [{key: rep[representative[key]] for key in shapes} for rep in reps], representative


def checkpoint_bytes(shapes: Mapping[str, tuple[int, ...]], element_size: int = 4) -> int:
    return sum(math.prod(shape) for shape in shapes.values()) * element_size


def route_flops(shapes: Mapping[str, tuple[int, ...]], num_tasks: int) -> tuple[float, float]:
    """(fp64, fp32) FLOPs of our route over every merged matrix (DESIGN.md: Gram + eigh route).

    Per matrix, m >= n after transposing, r = n, k = int(r/T), K = T k:
    fp64: T 2mn² (task Grams) + T 9n³ (eigh) + T 2mnk (ΔV) + 2(m+n)K² 2 (stack Grams, G^-1/2
    products) + 2 9K³ (eigh of the stack Grams); fp32: 2mnK (reconstruction).
    """
    fp64 = fp32 = 0.0
    for key, shape in shapes.items():
        if not is_matrix(key, shape):
            continue
        m, n = max(shape), min(shape)
        k = reference.rank_per_task(shape, num_tasks)
        if k == 0:
            continue
        big_k = num_tasks * k
        fp64 += (num_tasks * 2 * m * n * n + num_tasks * 9 * n ** 3 + num_tasks * 2 * m * n * k
                 + 2 * (m + n) * big_k ** 2 * 2 + 2 * 9 * big_k ** 3)
        fp32 += 2 * m * n * big_k
    return fp64, fp32


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
def provider_fn(provider: str, device: torch.device):
    """provider -> callable(task_vectors) -> merged dict (float32, on the inputs' device)."""
    if provider == "authors":
        return lambda tvs: reference.authors_fast_tsv_merge(tvs, exclude=EXCLUDE, compute_dtype=torch.float32)
    if provider == "exact":
        return lambda tvs: tsv_fast.fast_tsv_merge(tvs, exclude=EXCLUDE, exact=True, device=device)
    if provider.startswith("torch-"):  # torch-gram / torch-krylov: the torch backend with that top-k route
        return lambda tvs: _with_topk_route(provider[len("torch-"):], lambda: tsv_fast.fast_tsv_merge(
            tvs, exclude=EXCLUDE, backend="torch", device=device))
    return lambda tvs: tsv_fast.fast_tsv_merge(tvs, exclude=EXCLUDE, backend=provider, device=device)


TOPK_PROVIDERS = ("torch-gram", "torch-krylov")


def _with_topk_route(route: str, fn):
    """fn() with TSV_FAST_TOPK=route (the torch backend reads it per call), restored afterwards."""
    saved = os.environ.get("TSV_FAST_TOPK")
    os.environ["TSV_FAST_TOPK"] = route
    try:
        return fn()
    finally:
        if saved is None:
            del os.environ["TSV_FAST_TOPK"]
        else:
            os.environ["TSV_FAST_TOPK"] = saved


def providers_for(device: torch.device, wanted: Sequence[str] | None = None) -> list[str]:
    """`authors` first, then every backend that can serve ``device`` (optionally only ``wanted``)."""
    names = ["authors"] + [name for name, reasons in available_backends(device).items() if not reasons]
    if wanted:
        names.append("exact")  # opt-in only: it is the authors' route again
        names += list(TOPK_PROVIDERS) if "torch" in names else []
        missing = [name for name in wanted if name not in names]
        if missing:
            reasons = available_backends(device)
            raise SystemExit(f"provider(s) {missing} cannot run on {device}: "
                             + "; ".join(f"{n}: {reasons.get(n, ['unknown'])}" for n in missing))
        names = ["authors"] + [name for name in wanted if name != "authors"]
    return names


def subset(task_vectors: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> list[dict]:
    return [{key: tv[key] for key in keys} for tv in task_vectors]


# ------------------------------------------------------------------------------------------------
# Accuracy
# ------------------------------------------------------------------------------------------------
def rel_f(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    denom = float(torch.linalg.matrix_norm(ref))
    err = float(torch.linalg.matrix_norm(x.to(torch.float64) - ref))
    return err / denom if denom > 0 else err


def accuracy(merged: Mapping[str, torch.Tensor], oracle: Mapping[str, torch.Tensor],
             authors_err: Mapping[str, float], representative: Mapping[str, str]) -> dict:
    """Worst per-matrix rel_F against the fp64 oracle, with the authors' error and the contract."""
    worst_key, worst, failures, margin = "", -1.0, 0, 0.0
    for key, value in merged.items():
        rep = representative.get(key)
        if rep not in oracle:
            continue
        err = rel_f(value, oracle[rep])
        bound = max(CONTRACT_FLOOR, CONTRACT_FACTOR * authors_err[rep])
        failures += err > bound or not math.isfinite(err)
        margin = max(margin, err / bound)
        if err > worst or not math.isfinite(err):
            worst_key, worst = key, err
    return {"acc_worst_key": worst_key, "acc_rel_err": worst,
            "acc_authors_rel_err": authors_err[representative[worst_key]] if worst_key else math.nan,
            "acc_contract_ok": failures == 0, "acc_contract_failures": failures, "acc_worst_margin": margin}


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def environment(device: torch.device, config: str, command: str) -> dict:
    return {"device": str(device), "device_name": device_name(device), "torch_version": torch.__version__,
            "git_sha": git_sha(), "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", ""), "torch_threads": torch.get_num_threads(),
            "config": config, "command": command}


# ------------------------------------------------------------------------------------------------
# One workload
# ------------------------------------------------------------------------------------------------
def timed_run(fn, device: torch.device) -> tuple[float, int, str, object]:
    """Seconds, peak memory above the start (bytes), how it was measured, and the output of one call."""
    _timing.synchronize(device)
    with _timing.PeakMemory(device) as mem:
        start = time.perf_counter()
        out = fn()
        _timing.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, mem.peak_bytes, mem.method, out


class Interrupted(Exception):
    """SIGTERM (e.g. `timeout` of bench/gpu_check.sh): stop timing, report what was measured."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def run_workload(name: str, num_tasks: int, device: torch.device, *, providers: Sequence[str],
                 runs: int, warmup: int, blocks: int | None = None, keys: str | None = None,
                 authors_blocks: int | None = None, label: str = "", machine: Mapping | None = None, env: Mapping | None = None,
                 seed: int = 0, log=print, deadline: float | None = None) -> list[dict]:
    """Every provider on one (layout, T): a list of rows with ROW_FIELDS.

    ``deadline`` (time.monotonic()): no provider is warmed up and no timed round is started after
    it (each provider that started keeps at least one timed run), and an Interrupted exception
    during the timed runs ends them; either way the rows of what was measured are returned and a
    log line names what was skipped.
    """
    machine = machine or _timing.measure_machine(device)
    late = lambda: deadline is not None and time.monotonic() > deadline  # noqa: E731
    env = env or environment(device, "custom", " ".join(sys.argv))
    shapes = select_layout(name, blocks, keys)
    started = time.perf_counter()
    tvs, representative = make_task_vectors(name, num_tasks, shapes, seed=seed)
    on_device: dict[int, torch.Tensor] = {}  # same-shape keys keep sharing one tensor on the device
    tvs = [{key: on_device.setdefault(id(value), value.to(device)) for key, value in tv.items()} for tv in tvs]
    log(f"[{name} T={num_tasks}] generated {len(shapes)} keys ({len(set(representative.values()))} unique) "
        f"in {time.perf_counter() - started:.1f} s")

    unique_keys = list(dict.fromkeys(representative.values()))
    rep_tvs = subset(tvs, unique_keys)
    matrix_reps = [key for key in unique_keys if is_matrix(key, shapes[key])]
    started = time.perf_counter()
    oracle_all = reference.fast_tsv_merge(subset(tvs, matrix_reps), exclude=EXCLUDE, compute_dtype=torch.float64)
    oracle = {key: value for key, value in oracle_all.items()
              if reference.rank_per_task(shapes[key], num_tasks) > 0}
    log(f"[{name} T={num_tasks}] float64 oracle on {len(oracle)} unique matrices in "
        f"{time.perf_counter() - started:.1f} s")

    block_ids = sorted({b for b in map(block_of, shapes) if b is not None})
    num_blocks = max(len(block_ids), 1)
    params = sum(math.prod(s) for s in shapes.values())
    ckpt_bytes = checkpoint_bytes(shapes)
    flops64, flops32 = route_flops(shapes, num_tasks)
    floor_bw = (num_tasks + 1) * ckpt_bytes / machine["bandwidth_Bps"]
    floor_flops = flops64 / machine["gemm_fp64_flops"] + flops32 / machine["gemm_fp32_flops"]
    matrices = sum(is_matrix(k, s) for k, s in shapes.items())

    # warm-up, then the timed runs interleaved (authors, torch, ..., authors, torch, ...) so that a
    # machine whose load drifts biases no provider
    plans = []
    for provider in providers:
        if late():
            log(f"[{name} T={num_tasks}] {provider}: skipped, the time budget is spent")
            continue
        fn = provider_fn(provider, device)
        partial = provider == "authors" and authors_blocks is not None and authors_blocks < num_blocks
        warm = {}
        if partial or device.type == "cuda":
            # one run on one key per unique shape: every shape compiled / touched before timing, and
            # the authors' error on the shapes that a partial run does not time
            started = time.perf_counter()
            warm = fn(rep_tvs)
            _timing.synchronize(device)
            log(f"[{name} T={num_tasks}] {provider}: warm-up on one key per shape in "
                f"{time.perf_counter() - started:.1f} s")
        if partial:
            work = subset(tvs, [k for k in shapes if block_of(k) is not None and block_of(k) < authors_blocks])
        else:
            work = tvs
        for _ in range(warmup):
            fn(work)
        plans.append({"provider": provider, "fn": fn, "work": work, "partial": partial, "warm": warm,
                      "samples": [], "peak": 0, "method": "", "out": None})
    try:
        for round_ in range(runs):
            for plan in plans:
                if round_ > 0 and late():
                    continue
                plan["out"] = None  # never keep a provider's previous output alive during its next run
                seconds, peak, method, plan["out"] = timed_run(lambda: plan["fn"](plan["work"]), device)
                plan["samples"].append(seconds)
                plan["peak"], plan["method"] = max(plan["peak"], peak), method
                log(f"[{name} T={num_tasks}] {plan['provider']}: run {round_ + 1} {seconds:.3f} s")
    except Interrupted as why:
        log(f"[{name} T={num_tasks}] interrupted ({why}) during the timed runs: reporting what was measured")
    plans = [plan for plan in plans if plan["samples"] and plan["out"] is not None]
    if any(len(plan["samples"]) < runs for plan in plans):
        log(f"[{name} T={num_tasks}] fewer than {runs} runs for " + ", ".join(
            f"{plan['provider']} ({len(plan['samples'])})" for plan in plans if len(plan["samples"]) < runs)
            + " (time budget)")

    rows, authors_err, authors_per_block, authors_total = [], {}, None, None
    for plan in plans:
        provider, partial, samples = plan["provider"], plan["partial"], plan["samples"]
        timing = {"time_median_s": statistics.median(samples), "time_min_s": min(samples),
                  "time_max_s": max(samples), "samples_s": samples}
        memory = {"peak_mem_bytes": plan["peak"], "peak_mem_method": plan["method"]}
        out = {**plan.pop("warm"), **plan.pop("out")}
        if provider == "authors":
            authors_err = {key: rel_f(out[key], oracle[key]) for key in oracle}
        acc = accuracy(out, oracle, authors_err, representative)
        del out
        if provider == "authors":
            if partial:
                authors_per_block = timing["time_median_s"] / authors_blocks
            else:
                authors_total = timing["time_median_s"]
        if authors_total is not None:
            ratio, basis = authors_total / timing["time_median_s"], "same workload"
        elif authors_per_block is not None:
            ratio = authors_per_block / (timing["time_median_s"] / num_blocks)
            basis = (f"per-block normalised: authors timed on {authors_blocks} of {num_blocks} blocks "
                     f"(EXTRAPOLATED)")
        else:
            ratio, basis = math.nan, "no authors row"
        if provider == "authors" and partial:
            ratio = 1.0
        floor = max(floor_bw, floor_flops)
        row = {
            "workload": name + (f" ({label})" if label else "") + (f" [{blocks} blocks]" if blocks is not None and not label else "")
            + (f" [keys~{keys}]" if keys and not label else ""),
            "T": num_tasks, "provider": provider, "blocks": num_blocks, "matrices": matrices, "params": params,
            **{k: v for k, v in timing.items() if k != "samples_s"}, "runs": runs, "warmup": warmup,
            "ratio_vs_authors": ratio, "ratio_basis": basis,
            "authors_blocks_timed": authors_blocks if partial else (num_blocks if provider == "authors" else ""),
            **memory, "checkpoint_bytes": ckpt_bytes, **acc,
            "flops_fp64": flops64, "flops_fp32": flops32, "floor_bandwidth_s": floor_bw,
            "floor_flops_s": floor_flops,
            "time_over_floor": (timing["time_median_s"] / (floor * (authors_blocks / num_blocks if partial else 1)))
            if floor > 0 else math.nan,
            "bandwidth_GBps": machine["bandwidth_Bps"] / 1e9, "gemm_fp64_GFLOPs": machine["gemm_fp64_flops"] / 1e9,
            "gemm_fp32_GFLOPs": machine["gemm_fp32_flops"] / 1e9, **env,
            "samples_s": timing["samples_s"],
        }
        rows.append(row)
        log(format_row(row))
    return rows


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def format_row(row: Mapping) -> str:
    extrapolated = "EXTRAPOLATED" in str(row["ratio_basis"])
    return (f"{row['workload']:<18} T={row['T']:<3} {row['provider']:<9} {row['device']:<6} "
            f"{row['time_median_s']:9.3f} s  x{row['ratio_vs_authors']:6.2f}{'*' if extrapolated else ' '} "
            f"mem {row['peak_mem_bytes'] / 2**20:8.1f} MiB  err {row['acc_rel_err']:.2e} "
            f"(authors {row['acc_authors_rel_err']:.2e}, contract {'ok' if row['acc_contract_ok'] else 'FAIL'})  "
            f"floor {max(row['floor_bandwidth_s'], row['floor_flops_s']):.3f} s")


def print_table(rows: Sequence[Mapping]) -> None:
    print()
    print(f"{'workload':<18} {'T':<5} {'provider':<9} {'device':<6} {'median':>11}  {'ratio':>8}  "
          f"{'peak mem':>12}  {'rel_F err':>9} (authors, contract)  floor(bw|flops)")
    for row in rows:
        print(format_row(row) + f" ({row['floor_bandwidth_s']:.3f}|{row['floor_flops_s']:.3f})")
    if any("EXTRAPOLATED" in str(r["ratio_basis"]) for r in rows):
        print("* ratio per-block normalised: the authors were timed on fewer blocks (see ratio_basis)")


def save(rows: Sequence[dict], device: torch.device, config: str, out_dir: Path, meta: Mapping) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    stem = out_dir / f"merge_{device.type}_{date}_{config}"
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps({"meta": dict(meta), "rows": list(rows)}, indent=1) + "\n")
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def render(files: Sequence[Path]) -> str:
    """The README benchmark table from committed results JSON files."""
    lines = ["| workload | T | provider | device | median (s) | runs | vs authors | peak mem (MiB) | "
             "max rel_F vs fp64 (authors fp32) | contract | floor (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes, commands = [], []
    for path in files:
        data = json.loads(Path(path).read_text())
        commands.append(f"`{data['meta'].get('command', '?')}` -> `{Path(path).name}` "
                        f"({data['meta'].get('device_name', '?')}, torch {data['meta'].get('torch_version', '?')}, "
                        f"{data['meta'].get('timestamp', '?')}, git {str(data['meta'].get('git_sha', '?'))[:10]}"
                        f"{', ' + data['meta']['note'] if data['meta'].get('note') else ''})")
        for row in data["rows"]:
            mark = ""
            if "EXTRAPOLATED" in str(row["ratio_basis"]):
                mark = "*"
                notes.append(f"\\* {row['workload']} T={row['T']}: {row['ratio_basis']}.")
            floor = max(row["floor_bandwidth_s"], row["floor_flops_s"])
            lines.append(f"| {row['workload']} | {row['T']} | {row['provider']} | {row['device_name']} | "
                         f"{row['time_median_s']:.3g} | {row['runs']} | {row['ratio_vs_authors']:.1f}x{mark} | "
                         f"{row['peak_mem_bytes'] / 2**20:.0f} | {row['acc_rel_err']:.1e} "
                         f"({row['acc_authors_rel_err']:.1e}) | {'ok' if row['acc_contract_ok'] else 'FAIL'} | "
                         f"{floor:.3g} |")
    lines.append("")
    lines.extend(dict.fromkeys(notes))
    lines.append("Floor = max(bytes of T+1 fp32 checkpoints / copy bandwidth, FLOPs of our route / GEMM rate), "
                 "both measured in the same run. Peak memory: CUDA max_memory_allocated, or the CPU peak-RSS "
                 "increase over the merge.")
    lines.append("")
    lines.append("Generated by `python bench/bench_merge.py --render` from:")
    lines.extend(f"- {c}" for c in commands)
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text() if readme.exists() else ""
    block = f"{README_BEGIN}\n{table}{README_END}"
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Benchmark\n\n" + block + "\n"
    readme.write_text(text)


# ------------------------------------------------------------------------------------------------
# Per-stage profile of the torch route on one layer shape
# ------------------------------------------------------------------------------------------------
STAGES = ("cast to fp64", "task Gram", "eigh(task Gram)", "U = ΔV, σ", "stack Grams", "eigh(stack Grams)",
          "products X G^-1/2", "reconstruction fp32")


def profile_stages(shape: tuple[int, int], num_tasks: int, device: torch.device, *, runs: int = 3,
                   seed: int = 0) -> dict[str, float]:
    """Median seconds of each stage of TorchBackend's merge of one [T, m, n] layer (fp32 in)."""
    f64 = torch.float64
    backend = TorchBackend()
    deltas = synthetic.task_matrices(shape, num_tasks, shared=0.3, seed=seed, dtype=torch.float32).to(device)
    k = reference.rank_per_task(shape, num_tasks)
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}

    def stage(name, fn):
        _timing.synchronize(device)
        start = time.perf_counter()
        result = fn()
        _timing.synchronize(device)
        samples[name].append(time.perf_counter() - start)
        return result

    for _ in range(runs + 1):  # the first pass is the warm-up
        delta = stage("cast to fp64", lambda: deltas.to(f64))
        if delta.shape[-2] < delta.shape[-1]:
            delta = delta.mT
        gram = stage("task Gram", lambda: backend.task_gram(delta))
        evals, evecs = stage("eigh(task Gram)", lambda: backend.eigh(gram))

        def left_factors():
            right = evecs[..., -k:].flip(-1)
            left = delta @ right
            sigma = torch.linalg.vector_norm(left, dim=-2)
            return left / sigma.unsqueeze(-2), sigma, right
        u, sigma, v = stage("U = ΔV, σ", left_factors)
        u = u.permute(1, 0, 2).reshape(u.shape[1], -1)
        v = v.permute(1, 0, 2).reshape(v.shape[1], -1)
        sigma = sigma.reshape(-1)
        gu, gv = stage("stack Grams", lambda: (backend.stack_gram(u), backend.stack_gram(v)))
        (eu, qu), (ev, qv) = stage("eigh(stack Grams)", lambda: (backend.eigh(gu), backend.eigh(gv)))

        def products():
            return (u @ ((qu * eu.clamp_min(1e-300).rsqrt()) @ qu.mT),
                    v @ ((qv * ev.clamp_min(1e-300).rsqrt()) @ qv.mT))
        u_orth, v_orth = stage("products X G^-1/2", products)
        stage("reconstruction fp32", lambda: (u_orth * sigma).float() @ v_orth.float().mT)
    return {name: sorted(times[1:])[len(times[1:]) // 2] for name, times in samples.items()}


def run_profile(args, device: torch.device, env: Mapping) -> None:
    shape = tuple(int(x) for x in args.profile_shape.lower().split("x"))
    result = {"shape": list(shape), "runs": args.runs, **env, "stages": {}}
    for num_tasks in args.profile_tasks:
        stages = profile_stages(shape, num_tasks, device, runs=args.runs)
        flops64, flops32 = route_flops({"w": shape}, num_tasks)
        result["stages"][str(num_tasks)] = {**stages, "total": sum(stages.values()),
                                            "route_flops_fp64": flops64, "route_flops_fp32": flops32}
    print(f"\nper-stage median seconds of the torch route, {shape[0]}x{shape[1]}, {device}, "
          f"{torch.get_num_threads()} thread(s), {args.runs} runs")
    header = f"{'stage':<22}" + "".join(f"{'T=' + t:>18}" for t in result["stages"])
    print(header)
    for name in (*STAGES, "total"):
        cells = ""
        for t, st in result["stages"].items():
            share = 100 * st[name] / st["total"]
            cells += f"{st[name]:>10.3f} s {share:4.0f}%"
        print(f"{name:<22}{cells}")
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
        path = RESULTS / f"profile_{device.type}_{date}_{shape[0]}x{shape[1]}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--providers", nargs="*", help="backends besides authors (default: every available)")
    parser.add_argument("--workloads", nargs="*", help="override the config's workloads: NAME:T, e.g. vit-b-32:8")
    parser.add_argument("--blocks", type=int, help="limit every workload to its first N blocks")
    parser.add_argument("--keys", help="only keys matching this regex")
    parser.add_argument("--runs", type=int, help="timed runs per provider (default: per config)")
    parser.add_argument("--warmup", type=int, help="full untimed runs before timing (default: 0 cpu, 1 cuda); "
                        "a run on one key per unique shape always comes first")
    parser.add_argument("--authors-blocks", type=int,
                        help="time the authors on the first N blocks only; ratios become per-block normalised")
    parser.add_argument("--time-budget-s", type=float,
                        help="start no provider and no timed round after this many seconds (SIGTERM also "
                             "ends the timed runs); rows of what was measured are saved")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. 'noisy machine')")
    parser.add_argument("--tag", help="results file name tag (default: the config name)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--render", action="store_true", help="print the README table from the results files")
    parser.add_argument("--files", nargs="*", type=Path, help="results JSON files for --render "
                        "(default: bench/results/merge_*.json)")
    parser.add_argument("--readme", type=Path, help="with --render: replace the table block in this file")
    parser.add_argument("--profile", action="store_true", help="per-stage time of the torch route")
    parser.add_argument("--profile-shape", default="3072x768")
    parser.add_argument("--profile-tasks", nargs="*", type=int, default=[8, 20])
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.render:
        files = args.files or sorted(RESULTS.glob("merge_*.json"))
        table = render(files)
        print(table, end="")
        if args.readme:
            update_readme(args.readme, table)
        return []
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = shlex.join(["python", "bench/bench_merge.py", *(sys.argv[1:] if argv is None else argv)])
    env = environment(device, args.config, command)
    if args.profile:
        run_profile(args, device, env)
        return []
    config = CONFIGS[args.config]
    workloads = ([(w.split(":")[0], int(w.split(":")[1])) for w in args.workloads] if args.workloads
                 else config["workloads"])
    runs = args.runs or config["runs"]
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    # --workloads replaces the config's workloads and with them its block limit and key filter
    blocks = args.blocks if args.blocks is not None or args.workloads else config["blocks"]
    keys = args.keys if args.keys is not None or args.workloads else config["keys"]
    providers = providers_for(device, args.providers)
    machine = _timing.measure_machine(device)
    print(f"{env['device_name']}, torch {env['torch_version']}, {torch.get_num_threads()} thread(s); "
          f"copy {machine['bandwidth_Bps'] / 1e9:.1f} GB/s, GEMM fp64 {machine['gemm_fp64_flops'] / 1e9:.1f} "
          f"GFLOP/s, fp32 {machine['gemm_fp32_flops'] / 1e9:.1f} GFLOP/s; providers {providers}")
    meta = {**env, "machine": machine, "note": args.note, "runs": runs, "warmup": warmup}
    label = config.get("label", "") if keys == config["keys"] and blocks == config["blocks"] else ""
    rows = []
    deadline = None if args.time_budget_s is None else time.monotonic() + args.time_budget_s
    signal.signal(signal.SIGTERM, _raise_interrupted)
    paths = None
    for name, num_tasks in workloads:
        if deadline is not None and time.monotonic() > deadline:
            print(f"[{name} T={num_tasks}] skipped, the time budget is spent")
            continue
        try:
            rows += run_workload(name, num_tasks, device, providers=providers, runs=runs, warmup=warmup,
                                 blocks=blocks, keys=keys, authors_blocks=args.authors_blocks, label=label,
                                 machine=machine, env=env, seed=args.seed, deadline=deadline)
        except Interrupted as why:  # before any timed run of this workload: nothing to report for it
            print(f"[{name} T={num_tasks}] interrupted ({why}) before its timed runs")
            break
        if not args.no_save and rows:  # after every workload, so a run that is cut short keeps its rows
            paths = save(rows, device, args.tag or args.config, args.out_dir, meta)
    print_table(rows)
    if paths:
        print(f"wrote {paths[0]} and {paths[1]}")
    return rows


if __name__ == "__main__":
    main()
