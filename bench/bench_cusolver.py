"""Per-task top-k SVD on real layer shapes: tsv_fast._C (cuSOLVER) against the torch routes.

The problem: T same-shape task matrices Δ [T, m, n] (float32, as read from checkpoints), each
needing its top-k triplets, k = int(min(m, n) / T) (the paper's rank). Providers:

  torch.svd[<driver>]     torch.linalg.svd on the batch (default driver, gesvd, gesvdj, gesvda),
                          then the first k triplets
  torch.svd loop          torch.linalg.svd called once per matrix (what the authors' code does)
  torch.svd_lowrank       torch.svd_lowrank(q = k + 10, niter = 2), batched
  torch.eigh(gram64)      float64 Gram of the smaller side, batched torch.linalg.eigh, U = ΔV/σ
  torch.eigh loop(gram64) the same with torch.linalg.eigh called once per matrix
  ext.svd[<method>]       tsv_fast._C.batched_svd (gesvda in fp32 and fp64, gesvdj / gesvd /
                          gesvdp loops, gesvdr loop: randomized, block 2k, 10 power iterations)
  ext.eigh[<method>](gram64)  the Gram route with tsv_fast._C.batched_eigh (syev_batched, syevd)

Each time (CUDA events, warm-up, median of repeats) sits beside its accuracy: the relative
Frobenius error of the rank-k reconstruction U diag(S) Vᵀ against the float64 top-k
reconstruction of the same float32 input (float64 SVD up to min(m, n) = 1024, float64 Gram eigh
above; the "ref" column says which).
Inputs have a prescribed power-law spectrum σⱼ = 1/(1 + j) with random singular vectors.

Each row also carries a floor: max(bytes of the T matrices / copy bandwidth, FLOPs of the Gram
route T·(2mn² + 9n³ + 2mnk), n = min(m, n), / fp64 GEMM rate), both measured at the start.

Usage (one command runs everything; rows are appended as they are measured):
    python bench/bench_cusolver.py                      # all models, T = 8, 14, 20
    python bench/bench_cusolver.py --models vit-b-32 --tasks 8 --quick
    python bench/bench_cusolver.py --dry-run            # CPU, tiny shapes: checks the script
Writes bench/results/cusolver_<gpu>_<utc time>.csv and .json (one row per provider, shape, T).
Without CUDA it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


MODELS = {
    "tiny": [(40, 24), (24, 40)],  # --dry-run only
    "vit-b-32": [(768, 768), (3072, 768), (768, 3072), (2304, 768)],
    "vit-l-14": [(1024, 1024), (4096, 1024), (1024, 4096), (3072, 1024)],
    "llama-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
}
TASKS = (8, 14, 20)
SVD_REF_MAX_DIM = 1024  # float64 SVD reference up to this min(m, n); float64 Gram eigh above
DEVICE = "cuda"  # a module constant so a CPU dry run can patch it
TORCH_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")
EXT_SVD = (("gesvda", torch.float32), ("gesvda", torch.float64), ("gesvdj", torch.float32),
           ("gesvd", torch.float32), ("gesvdp", torch.float32), ("gesvdr", torch.float32))
EXT_EIGH = ("syev_batched", "syevd")
FIELDS = ["op", "provider", "model", "m", "n", "T", "k", "dtype", "median_ms", "p20_ms", "p80_ms",
          "reps", "rel_err", "ref", "floor_ms", "status", "gpu", "torch", "cuda", "cusolver", "git_sha",
          "timestamp"]


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------ inputs
def make_tasks(m: int, n: int, T: int, seed: int) -> torch.Tensor:
    """T float32 matrices [T, m, n] with σⱼ = 1/(1+j) and random orthonormal singular vectors."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    r = min(m, n)
    sigma = 1.0 / torch.arange(1, r + 1, device=DEVICE, dtype=torch.float64)
    out = torch.empty(T, m, n, device=DEVICE, dtype=torch.float32)
    for t in range(T):  # one at a time: the float64 temporaries of 11008 x 4096 are large
        u, _ = torch.linalg.qr(torch.randn(m, r, device=DEVICE, dtype=torch.float64, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, r, device=DEVICE, dtype=torch.float64, generator=g))
        out[t] = ((u * sigma) @ v.T).float()
        del u, v
    return out


def gram64(A: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Float64 Gram of the smaller side: (ΔᵀΔ if tall else ΔΔᵀ, wide flag)."""
    A = A.double()
    wide = A.shape[-2] < A.shape[-1]
    if wide:
        A = A.mT
    return A.mT @ A, wide


def factors_from_eig(A: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, k: int, wide: bool):
    A = A.double()
    if wide:
        A = A.mT
    right = evecs[..., -k:].flip(-1)
    left = A @ right
    sigma = torch.linalg.vector_norm(left, dim=-2)
    left = left / sigma.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    return (right, sigma, left) if wide else (left, sigma, right)


class Reference:
    """Float64 top-k reconstructions of the float32 inputs, computed once per shape: from a float64
    torch.linalg.svd where min(m, n) <= SVD_REF_MAX_DIM, else from the float64 Gram's eigh (whose
    error, about eps·(σ₁/σ_k)² <= 1e-10 for these spectra, is far below the float32 errors
    measured; the gram64 providers then agree with it by construction)."""

    def __init__(self, A: torch.Tensor, svd_max_dim: int = SVD_REF_MAX_DIM):
        self.A = A
        self.route = "svd64" if min(A.shape[-2:]) <= svd_max_dim else "gram64-eigh"
        if self.route == "svd64":
            self.U, self.S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
            self.V = Vh.mT
        else:
            G, self.wide = gram64(A)
            self.evals, self.evecs = torch.linalg.eigh(G)
            del G

    def recon(self, t: int, k: int) -> torch.Tensor:
        if self.route == "svd64":
            U, S, V = self.U[t, :, :k], self.S[t, :k], self.V[t, :, :k]
        else:
            U, S, V = factors_from_eig(self.A[t], self.evals[t], self.evecs[t], k, self.wide)
        return (U * S) @ V.mT


def rel_err(ref: Reference, U, S, V, T: int, k: int) -> float:
    """Largest relative Frobenius error over the T matrices of the rank-k reconstruction."""
    worst = 0.0
    for t in range(T):
        want = ref.recon(t, k)
        got = (U[t].double() * S[t].double()) @ V[t].double().mT
        worst = max(worst, float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)))
        del want, got
    return worst


# ------------------------------------------------------------------------------------ providers
def providers(ext, k: int):
    """name -> (dtype label, fn(A [T, m, n] fp32) -> (U, S, V)); unavailable ones -> reason str."""
    out = {}
    cpu = DEVICE == "cpu"  # dry run: torch's CPU SVD takes no driver
    for driver in TORCH_DRIVERS[:1] if cpu else TORCH_DRIVERS:
        def run(A, driver=driver):
            U, S, Vh = torch.linalg.svd(A, full_matrices=False, driver=driver)
            return U[..., :k], S[..., :k], Vh[..., :k, :].mT
        out[f"torch.svd[{driver or 'default'}]"] = ("float32", run)

    def svd_loop(A):
        parts = [torch.linalg.svd(a, full_matrices=False) for a in A]
        return (torch.stack([u[:, :k] for u, _, _ in parts]), torch.stack([s[:k] for _, s, _ in parts]),
                torch.stack([vh[:k].mT for _, _, vh in parts]))
    out["torch.svd loop"] = ("float32", svd_loop)

    def lowrank(A):
        U, S, V = torch.svd_lowrank(A, q=min(k + 10, min(A.shape[-2:])), niter=2)
        return U[..., :k], S[..., :k], V[..., :k]
    out["torch.svd_lowrank"] = ("float32", lowrank)

    def torch_gram(A):
        G, wide = gram64(A)
        evals, evecs = torch.linalg.eigh(G)
        return factors_from_eig(A, evals, evecs, k, wide)
    out["torch.eigh(gram64)"] = ("float64", torch_gram)

    def torch_gram_loop(A):
        G, wide = gram64(A)
        pairs = [torch.linalg.eigh(g) for g in G]
        return factors_from_eig(A, torch.stack([w for w, _ in pairs]), torch.stack([v for _, v in pairs]), k, wide)
    out["torch.eigh loop(gram64)"] = ("float64", torch_gram_loop)

    for method, dtype in EXT_SVD:
        name = f"ext.svd[{method}]"
        label = str(dtype).replace("torch.", "")
        if isinstance(ext, str):
            out[f"{name}/{label}"] = ext
            continue

        def run(A, method=method, dtype=dtype):
            return ext.batched_topk_svd(A.to(dtype), k, method)
        out[f"{name}/{label}"] = (label, run)

    for method in EXT_EIGH:
        name = f"ext.eigh[{method}](gram64)"
        if isinstance(ext, str):
            out[name] = ext
            continue
        if method == "syev_batched" and not ext._ext().has_xsyev_batched():
            out[name] = "built without cusolverDnXsyevBatched"
            continue

        def run(A, method=method):
            G, wide = gram64(A)
            evals, evecs = ext.batched_eigh(G, method)
            return factors_from_eig(A, evals, evecs, k, wide)
        out[name] = ("float64", run)
    return out


class CpuStandIn:
    """--dry-run: the extension's Python API answered by torch on the CPU, so that every provider's
    code path runs without a GPU (its figures are torch's, and meaningless)."""

    @staticmethod
    def batched_topk_svd(A, k, method="auto", **options):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[..., :k], S[..., :k], Vh[..., :k, :].mT

    @staticmethod
    def batched_eigh(A, method="auto", **options):
        return torch.linalg.eigh(A)

    @staticmethod
    def _ext():
        return type("Ext", (), {"has_xsyev_batched": staticmethod(lambda: True),
                                "cusolver_version": staticmethod(lambda: 0)})


def time_cuda(fn, *, warmup: int, reps: int, slow_s: float):
    """Median / quantiles (ms) with CUDA events on the current stream (wall clock on the CPU dry
    run). A warm-up slower than ``slow_s`` is reported as the single sample (marked by reps = 1)."""
    cuda = DEVICE != "cpu"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    result = None
    samples = []
    for i in range(warmup + reps):
        if cuda:
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            result = fn()
            ms = (time.perf_counter() - began) * 1e3
        if i < warmup:
            if ms > slow_s * 1e3:
                return result, [ms]
            continue
        samples.append(ms)
    return result, samples


def quantile(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tasks", nargs="+", type=int, default=list(TASKS))
    parser.add_argument("--providers", nargs="*", default=None,
                        help="substrings; run only providers whose name contains one of them")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--slow-s", type=float, default=10.0,
                        help="a warm-up slower than this is kept as the only sample, and the provider "
                             "is skipped for larger T of the same shape")
    parser.add_argument("--time-budget-s", type=float, default=520.0,
                        help="stop starting new measurements after this many seconds (the default fits "
                             "a 10-minute job; raise it, or run one --models at a time)")
    parser.add_argument("--quick", action="store_true", help="reps = 2, slow-s = 3")
    parser.add_argument("--shapes", nargs="*", help="only these MxN shapes of the chosen models, e.g. 4096x1024")
    parser.add_argument("--ref-max-dim", type=int, default=SVD_REF_MAX_DIM,
                        help="float64 SVD reference up to this min(m, n), float64 Gram eigh above (0: always the Gram)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, torch providers only: checks the script without a GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.slow_s = 2, 3.0
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        args.models, args.tasks = ["tiny"], [t for t in args.tasks if t <= 4] or [3]
        print("bench_cusolver: --dry-run: CPU, tiny shapes, figures are meaningless")
    elif not torch.cuda.is_available():
        print("bench_cusolver: no CUDA device visible (torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}); nothing to measure.")
        return 1 if os.environ.get("TSV_FAST_BENCH_REQUIRE_GPU", "0") == "1" else 0

    from tsv_fast.backends import cusolver as ext
    reason = None if args.dry_run else ext.extension_unavailable_reason()
    if args.dry_run:
        ext = CpuStandIn  # the provider code runs; the figures are torch's
    ext_or_reason = ext if reason is None else f"tsv_fast._C unavailable: {reason}"
    if reason:
        print(f"bench_cusolver: {ext_or_reason}; measuring the torch providers only")

    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE fp32 everywhere (DESIGN.md §2)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = "cpu-dryrun" if args.dry_run else torch.cuda.get_device_properties(0).name
    sys.path.insert(0, str(ROOT / "bench"))
    import _timing  # noqa: E402 - the machine's copy bandwidth and fp64 GEMM rate, for the floors

    machine = _timing.measure_machine(torch.device(DEVICE), runs=2 if args.dry_run else 5)
    meta = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cusolver": ext._ext().cusolver_version() if reason is None else "",
            "git_sha": git_sha(), "timestamp": stamp, "bandwidth_GBps": machine["bandwidth_Bps"] / 1e9,
            "gemm_fp64_GFLOPs": machine["gemm_fp64_flops"] / 1e9}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    csv_path = args.out / f"cusolver_{slug}_{stamp}.csv"
    rows = []
    began = time.monotonic()
    print(f"bench_cusolver: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; copy "
          f"{meta['bandwidth_GBps']:.0f} GB/s, fp64 GEMM {meta['gemm_fp64_GFLOPs']:.0f} GFLOP/s; writing {csv_path}")

    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()

        def emit(**row):
            row = {**{k: "" for k in FIELDS}, **meta, "op": "topk_svd", **row}
            rows.append(row)
            writer.writerow(row)
            f.flush()
            err = row["rel_err"]
            print(f"  {row['provider']:<32} T={row['T']:<3} k={row['k']:<5} "
                  f"{row['median_ms'] if row['median_ms'] != '' else '-':>10} ms  "
                  f"err {err if err != '' else '-'}  {row['status']}", flush=True)

        for model in args.models:
            for m, n in MODELS[model]:
                if args.shapes and f"{m}x{n}" not in args.shapes:
                    continue
                print(f"{model} {m}x{n}", flush=True)
                A_all = make_tasks(m, n, max(args.tasks), seed=m * 7 + n)
                ref = Reference(A_all, args.ref_max_dim)
                too_slow: set[str] = set()
                for T in sorted(args.tasks):
                    k = int(min(m, n) * (1 / T))
                    A = A_all[:T].contiguous()
                    small, big = min(m, n), max(m, n)
                    floor_s = max(4.0 * T * m * n / machine["bandwidth_Bps"],
                                  T * (2.0 * big * small ** 2 + 9.0 * small ** 3 + 2.0 * big * small * k)
                                  / machine["gemm_fp64_flops"])
                    base = dict(model=model, m=m, n=n, T=T, k=k, floor_ms=f"{floor_s * 1e3:.3f}")
                    for name, spec in providers(ext_or_reason, k).items():
                        if args.providers and not any(p in name for p in args.providers):
                            continue
                        if isinstance(spec, str):
                            emit(**base, provider=name, status=f"skipped: {spec}")
                            continue
                        label, fn = spec
                        if name in too_slow:
                            emit(**base, provider=name, dtype=label,
                                 status=f"skipped: slower than {args.slow_s} s at a smaller T")
                            continue
                        if time.monotonic() - began > args.time_budget_s:
                            emit(**base, provider=name, dtype=label, status="skipped: time budget")
                            continue
                        try:
                            (U, S, V), samples = time_cuda(lambda: fn(A), warmup=args.warmup,
                                                           reps=args.reps, slow_s=args.slow_s)
                            err = rel_err(ref, U, S, V, T, k)
                            del U, S, V
                            status = "ok" if len(samples) > 1 or args.reps == 1 else "ok: single run (slow)"
                            if len(samples) == 1 and args.reps > 1:
                                too_slow.add(name)
                            emit(**base, provider=name, dtype=label,
                                 median_ms=f"{statistics.median(samples):.3f}",
                                 p20_ms=f"{quantile(samples, 0.2):.3f}",
                                 p80_ms=f"{quantile(samples, 0.8):.3f}", reps=len(samples),
                                 rel_err=f"{err:.3e}" if math.isfinite(err) else "nan", ref=ref.route,
                                 status=status)
                        except Exception as exc:  # a provider failing must not end the run
                            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
                            emit(**base, provider=name, dtype=label,
                                 status=f"error: {type(exc).__name__}: {msg}")
                        if DEVICE != "cpu":
                            torch.cuda.empty_cache()
                del A_all, ref
                if DEVICE != "cpu":
                    torch.cuda.empty_cache()

    json_path = csv_path.with_suffix(".json")
    json_path.write_text(json.dumps({"meta": meta, "args": {k: str(v) for k, v in vars(args).items()},
                                     "rows": rows}, indent=1))
    print(f"bench_cusolver: wrote {csv_path} and {json_path} "
          f"({len(rows)} rows, {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
