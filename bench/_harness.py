"""Shared timing harness of the kernel benchmarks (bench/bench_<op>.py).

* ``require_cuda()`` prints a clear message and exits 0 without a CUDA device.
* ``time_ms(fn)``: CUDA-event timing after warm-up, median and 20/80 % quantiles of many runs
  (the L2 cache is flushed before each run so small shapes are not measured from cache).
* ``ceilings()``: the H100 roofs measured in the same run: plain cuBLAS GEMMs (fp64, IEEE fp32,
  TF32, bf16; 8192³) and a device-to-device copy (GB/s counts read + write).
* ``Recorder``: one row per (op, provider, shape, dtype) with GPU name, versions, git sha and a
  timestamp, written as CSV and JSON into bench/results/.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: Where the result files go (TSV_FAST_BENCH_RESULTS overrides: bench/gpu_check.sh collects them).
RESULTS = Path(os.environ.get("TSV_FAST_BENCH_RESULTS", ROOT / "bench" / "results"))

#: Layer shapes (m, n) the benchmarks use: ViT-B/32 MLP and attention, ViT-L/14 MLP, LLaMA-7B MLP.
LAYER_SHAPES = {"vit-b32-mlp": (3072, 768), "vit-b32-attn": (768, 768), "vit-l14-mlp": (4096, 1024),
                "llama7b-mlp": (11008, 4096)}
TASK_COUNTS = (8, 20)
#: TSV_FAST_BENCH_SHAPES=vit-l14-mlp,... and TSV_FAST_BENCH_TASKS=20,...: a subset (time-boxed runs).
if os.environ.get("TSV_FAST_BENCH_SHAPES"):
    LAYER_SHAPES = {name: LAYER_SHAPES[name] for name in os.environ["TSV_FAST_BENCH_SHAPES"].split(",")}
if os.environ.get("TSV_FAST_BENCH_TASKS"):
    TASK_COUNTS = tuple(int(t) for t in os.environ["TSV_FAST_BENCH_TASKS"].split(","))

#: TSV_FAST_BENCH_DRYRUN=1: run every benchmark's code path on CPU under the Triton interpreter at
#: tiny shapes (wall-clock timing, meaningless figures) to check the scripts without a GPU.
DRYRUN = os.environ.get("TSV_FAST_BENCH_DRYRUN", "0") == "1"
#: TSV_FAST_BENCH_REQUIRE_GPU=1 (bench/gpu_check.sh): no GPU is an error, not a polite exit 0.
REQUIRE_GPU = os.environ.get("TSV_FAST_BENCH_REQUIRE_GPU", "0") == "1"
DEV = "cpu" if DRYRUN else "cuda"
if DRYRUN:
    os.environ["TRITON_INTERPRET"] = "1"
    LAYER_SHAPES = {"tiny-tall": (40, 24), "tiny-wide": (24, 40)}
    TASK_COUNTS = (2, 3)


def require_cuda(name: str) -> None:
    if DRYRUN:
        print(f"{name}: TSV_FAST_BENCH_DRYRUN=1: CPU interpreter dry run at tiny shapes, figures are meaningless")
        return
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device found; the kernel benchmarks need a GPU (run them on an H100 with "
              f"`python bench/bench_kernels.py`). Nothing was measured.")
        sys.exit(1 if REQUIRE_GPU else 0)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(f"{name}: TRITON_INTERPRET is set; unset it to benchmark compiled kernels. Nothing was measured.")
        sys.exit(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch baselines use IEEE fp32, like the torch backend


def kernel(op: str):
    """tsv_fast.kernels.<op> (from the checkout when not installed)."""
    from tsv_fast.backends.triton import kernel_module

    return kernel_module(op)


_FLUSH: torch.Tensor | None = None


def time_ms(fn, *, warmup: int = 3, reps: int = 15, flush_l2: bool = True) -> dict[str, float]:
    """Median and 20/80 % quantiles (ms) of ``fn()`` over ``reps`` runs, timed with CUDA events."""
    global _FLUSH
    if DRYRUN:
        fn()
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return {"ms": ms, "ms_p20": ms, "ms_p80": ms}
    if flush_l2 and _FLUSH is None:
        _FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")  # > H100's 50 MB L2
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush_l2:
            _FLUSH.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3]}


def ceilings() -> dict[str, float]:
    """Roofs measured now on this GPU: cuBLAS GEMM TFLOP/s per dtype and device-copy GB/s."""
    roofs = {}
    if DRYRUN:
        return {"gemm_fp64_tflops": 0.0, "gemm_fp32_ieee_tflops": 0.0, "gemm_tf32_tflops": 0.0,
                "gemm_bf16_tflops": 0.0, "memcpy_gbps": 0.0}
    size = 8192
    for label, dtype, tf32 in [("gemm_fp64", torch.float64, False), ("gemm_fp32_ieee", torch.float32, False),
                               ("gemm_tf32", torch.float32, True), ("gemm_bf16", torch.bfloat16, False)]:
        a = torch.randn(size, size, device="cuda").to(dtype)
        b = torch.randn(size, size, device="cuda").to(dtype)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        t = time_ms(lambda: a @ b, reps=5, flush_l2=False)["ms"]
        roofs[label + "_tflops"] = 2 * size ** 3 / t / 1e9
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), reps=10, flush_l2=False)["ms"]
    roofs["memcpy_gbps"] = 2 * src.numel() / t / 1e6
    del src, dst
    torch.cuda.empty_cache()
    return roofs


def environment() -> dict[str, str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    return {"gpu": "cpu-dryrun" if DRYRUN else torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": str(torch.version.cuda),
            "triton": triton_version, "python": platform.python_version(), "git_sha": sha,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class Recorder:
    """Collects benchmark rows and writes them to bench/results/<name>.csv and .json."""

    FIELDS = ["op", "provider", "shape", "tasks", "dtype", "precision", "ms", "ms_p20", "ms_p80", "tflops", "gbps",
              "speedup_vs_torch", "gemm_ms", "over_gemm", "roof", "roof_value", "floor_ms", "max_rel_err"]

    def __init__(self, name: str, roofs: dict[str, float] | None = None):
        self.name = name
        self.env = environment()
        self.roofs = ceilings() if roofs is None else roofs
        self.rows: list[dict] = []
        print(f"# {name} on {self.env['gpu']} (torch {self.env['torch']}, triton {self.env['triton']}, "
              f"CUDA {self.env['cuda']}, git {self.env['git_sha']})")
        print("# roofs: " + ", ".join(f"{k}={v:.1f}" for k, v in self.roofs.items()))

    def add(self, op: str, provider: str, shape: str, tasks: int, dtype: str, precision: str, timing: dict,
            flops: float = 0.0, bytes_moved: float = 0.0, roof: str = "", baseline_ms: float | None = None,
            max_rel_err: float | None = None, gemm_ms: float | None = None) -> dict:
        """One row. ``baseline_ms``: the torch sequence the op replaces; ``gemm_ms``: a plain cuBLAS
        GEMM of the op's size (operands given); floor = max(FLOPs / roof, bytes / copy bandwidth)."""
        roof_tflops = self.roofs.get(roof, 0.0) if roof else 0.0
        bandwidth = self.roofs.get("memcpy_gbps", 0.0)
        floor = max(flops / roof_tflops / 1e9 if flops and roof_tflops else 0.0,
                    bytes_moved / bandwidth / 1e6 if bytes_moved and bandwidth else 0.0)
        row = {"op": op, "provider": provider, "shape": shape, "tasks": tasks, "dtype": dtype, "precision": precision,
               **{k: round(v, 4) for k, v in timing.items()},
               "tflops": round(flops / timing["ms"] / 1e9, 2) if flops else "",
               "gbps": round(bytes_moved / timing["ms"] / 1e6, 1) if bytes_moved else "",
               "speedup_vs_torch": round(baseline_ms / timing["ms"], 2) if baseline_ms else "",
               "gemm_ms": round(gemm_ms, 4) if gemm_ms else "",
               "over_gemm": round(timing["ms"] / gemm_ms, 3) if gemm_ms else "",
               "roof": roof, "roof_value": round(roof_tflops, 1) if roof else "",
               "floor_ms": round(floor, 4) if floor else "",
               "max_rel_err": f"{max_rel_err:.2e}" if max_rel_err is not None else ""}
        self.rows.append(row)
        print("  " + "  ".join(f"{k}={row[k]}" for k in self.FIELDS if row[k] != ""))
        return row

    def write(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / (self.name + ("_dryrun" if DRYRUN else ""))
        rows = [{**row, **self.env} for row in self.rows]
        with open(stem.with_suffix(".csv"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.FIELDS + list(self.env))
            writer.writeheader()
            writer.writerows(rows)
        stem.with_suffix(".json").write_text(json.dumps({"env": self.env, "roofs": self.roofs, "rows": self.rows},
                                                        indent=1))
        print(f"# wrote {stem}.csv and {stem}.json")
        return stem


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float(torch.linalg.vector_norm(got.double() - want) / torch.linalg.vector_norm(want).clamp_min(1e-300))


def free() -> None:
    if DRYRUN:
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
