"""The torch backend: the fast route in plain torch ops, on any device.

Precision is the design here (DESIGN.md §2): the task stacks of real models are ill-conditioned, so
the stack Grams, G^(-1/2) and the products with it run in float64; only the final reconstruction
GEMM, whose operands are orthonormal, runs in the compute dtype. Each task's top-k comes from one of
two routes (``TorchBackend.topk_route``):

* ``gram``: the float64 task Gram and the top-k eigenvectors of LAPACK's MRRR solver; the reference
  precision route, for float64 inputs, small matrices and k close to min(m, n);
* ``krylov``: certified block Krylov with float32 GEMMs on Δ (``tsv_fast.backends.krylov``); tasks it
  cannot certify are recomputed by the Gram route. ``auto`` takes it only where it was measured
  faster (nowhere yet, see KRYLOV_AUTO); ``TSV_FAST_TOPK=krylov`` or ``TorchBackend.topk`` asks for it.

On the CPU the tasks of a call are spread over ``torch.get_num_threads()`` worker threads, each
single-threaded (torch ops and the ctypes LAPACK calls release the GIL): small eigensolves and
tall-skinny GEMMs scale far better across tasks than inside one BLAS call.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ..reference import GRAM_RTOL, ZERO_RTOL, polar_ref, sti_ref, topk_svd_ref
from . import _lapack, krylov

F64 = torch.float64

TOPK_ROUTES = ("auto", "gram", "krylov")
#: device type -> the largest k / min(m, n) for which ``auto`` takes the Krylov route (absent: never),
#: for min(m, n) >= KRYLOV_MIN_DIM. Empty on purpose, by measurement (bench/bench_topk.py): on the
#: CPU the certified Krylov top-k needs a Krylov space of ~0.9 min(m, n) on real task vectors
#: (all-MiniLM-L6 fine-tunes, whose spectra decay slowly past k), where the Gram route is cheaper,
#: and gains only 1.0-1.6x on the fast-decaying synthetic spectra; on CUDA it is not measured yet.
KRYLOV_AUTO: dict[str, float] = {}
KRYLOV_MIN_DIM = 256
#: Krylov dimension budget as a fraction of min(m, n): beyond it the Gram route is cheaper (on the
#: CPU the FLOP model at the measured fp32/fp64 GEMM rates breaks even near 0.6; the CUDA value is a
#: placeholder until a GPU run measures it: fp64 GEMMs are cheap there, the eigensolver is not).
KRYLOV_BUDGET = {"cpu": 0.5, "cuda": 0.75}


def gram(x: Tensor) -> Tensor:
    """XᵀX of [..., m, n] float64. On the CPU BLAS's dsyrk computes one triangle, half the flops of
    a GEMM, through a call that releases the GIL (tsv_fast.backends._lapack); with several CPU
    threads the rows are split between them and the partial Grams summed."""
    if x.device.type != "cpu" or x.dtype != F64 or not _lapack.AVAILABLE or x.numel() == 0:
        return x.mT @ x
    flat = x.reshape(-1, *x.shape[-2:])

    def rows_gram(rows: list[int]) -> Tensor:
        part = flat[:, rows[0]:rows[-1] + 1]
        return torch.stack([torch.from_numpy(_lapack.gram(matrix.numpy())) for matrix in part])

    out = sum(_in_parallel(rows_gram, flat.shape[1], x.device))
    return out.reshape(*x.shape[:-2], x.shape[-1], x.shape[-1])


def factors_from_projection(left: Tensor, right: Tensor, wide: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(U, σ, V) from ΔV and V, where V holds the top eigenvectors of the smaller-side Gram.

    σ comes from the column norms of ΔV, accurate even where the eigenvalue σ² is tiny; numerically
    zero triplets (σ <= ZERO_RTOL · σ₁ of their task) become zero columns with σ = 0. For a wide Δ
    the roles were swapped (Gram ΔΔᵀ), so they are swapped back.
    """
    sigma = torch.linalg.vector_norm(left, dim=-2)
    keep = sigma > ZERO_RTOL * sigma.amax(dim=-1, keepdim=True)
    sigma = sigma * keep
    left = left * torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(F64).tiny), 0.0).unsqueeze(-2)
    right = right * keep.unsqueeze(-2)
    return (right, sigma, left) if wide else (left, sigma, right)


def krylov_unsuitable(shape: tuple[int, int], k: int, dtype: torch.dtype, device: torch.device,
                      route: str = "auto") -> str | None:
    """Why the Krylov route does not run on this input (None: it does). ``route="krylov"`` skips the
    measured preferences and keeps only what the method needs."""
    r = min(shape)
    b = krylov.block_size(k, r)
    if k < 1 or k + b > krylov_budget(k, r, device):
        return f"k = {k} leaves no room for a Krylov space of block {b} in the budget of min(m, n) = {r}"
    if route == "krylov":
        return None
    if dtype == F64:
        return "float64 inputs ask for float64 factors; the Krylov GEMMs are float32"
    if device.type not in KRYLOV_AUTO:
        return f"auto keeps the Gram route on {device.type} (measured; see KRYLOV_AUTO); TSV_FAST_TOPK=krylov asks for it"
    if r < KRYLOV_MIN_DIM:
        return f"min(m, n) = {r} < {KRYLOV_MIN_DIM}: the Gram route is as fast"
    if k > KRYLOV_AUTO[device.type] * r:
        return f"k / min(m, n) = {k / r:.2f} above the measured crossover on {device.type}"
    return None


def krylov_budget(k: int, r: int, device: torch.device) -> int:
    return krylov.max_dim(r, krylov.block_size(k, r), KRYLOV_BUDGET.get(device.type, 0.5))


def _layer_runs(rows: list[int], tasks: int) -> list[tuple[int, int, int]]:
    """(position, start, stop) of the runs of consecutive flat indices that share a layer."""
    runs, pos = [], 0
    for row in rows:
        if runs and row == runs[-1][2] and row // tasks == runs[-1][1] // tasks:
            runs[-1] = (runs[-1][0], runs[-1][1], row + 1)
        else:
            runs.append((pos, row, row + 1))
        pos += 1
    return runs


def deltas(finetuned: Tensor, pretrained: Tensor | None, rows: list[int], dtype: torch.dtype) -> Tensor:
    """Δ = finetuned - pretrained of the flat tasks ``rows`` of [L, T, m, n], in ``dtype`` (one
    rounding: a float32 Δ of float32 weights is the exact difference rounded once)."""
    layers, tasks, m, n = finetuned.shape
    flat = finetuned.reshape(layers * tasks, m, n)
    out = torch.empty(len(rows), m, n, dtype=dtype, device=finetuned.device)
    for pos, start, stop in _layer_runs(rows, tasks):
        part = out[pos:pos + stop - start]
        part.copy_(flat[start:stop])
        if pretrained is not None:
            part.sub_(pretrained[start // tasks].to(dtype))
    return out


def _in_parallel(fn, batch: int, device: torch.device) -> list:
    """fn(rows) over contiguous shares of range(batch): one per CPU thread, each single-threaded."""
    workers = min(torch.get_num_threads(), batch) if device.type == "cpu" else 1
    if workers <= 1:
        return [fn(list(range(batch)))]
    bounds = [batch * i // workers for i in range(workers + 1)]
    shares = [list(range(bounds[i], bounds[i + 1])) for i in range(workers)]

    def work(rows):
        _lapack.single_threaded_in_this_thread()
        return fn(rows)

    with _POOL_LOCK:  # one pool at a time, so that concurrent callers restore the right thread count
        saved = torch.get_num_threads()
        torch.set_num_threads(1)  # process-wide: the workers are the parallelism now
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="tsv-fast-topk") as pool:
                return list(pool.map(work, shares))
        finally:
            torch.set_num_threads(saved)


_POOL_LOCK = threading.Lock()


class Backend:
    """Interface of a compute backend; see tsv_fast.backends for the ops and their shapes."""

    name = "base"

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        return [f"{self.name}: not implemented"]


class TorchBackend(Backend):
    name = "torch"

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        return []

    # -- building blocks that faster backends replace -------------------------------------------
    def task_gram(self, delta: Tensor) -> Tensor:
        """[..., m, n] float64 with m >= n -> ΔᵀΔ [..., n, n] float64."""
        return gram(delta)

    def eigh(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        """Symmetric eigendecomposition, eigenvalues ascending (torch.linalg.eigh semantics)."""
        return torch.linalg.eigh(gram)

    def topk_eigh(self, gram: Tensor, k: int) -> Tensor:
        """Eigenvectors of the k largest eigenvalues, largest first: [..., n, k] -> [..., n, k].

        On the CPU LAPACK's MRRR solver (dsyevr) computes only those k vectors: about 2x faster than
        a full eigh at n = 768 (measured 0.115 s vs 0.246 s), the tridiagonal reduction being shared.
        """
        n = gram.shape[-1]
        if gram.device.type == "cpu" and k < n and _lapack.AVAILABLE:
            flat = gram.reshape(-1, n, n).numpy()
            vectors = [_lapack.top_eigh(g.copy(), k)[1] for g in flat]
            return torch.from_numpy(np.stack(vectors)).reshape(*gram.shape[:-1], k)
        return self.eigh(gram)[1][..., -k:].flip(-1)

    def stack_gram(self, stack: Tensor) -> Tensor:
        return gram(stack)

    # -- the ops of the merge ----------------------------------------------------------------------
    #: "auto", "gram" or "krylov"; None: the environment variable TSV_FAST_TOPK, else "auto"
    topk = None

    def topk_route(self, shape: tuple[int, int], k: int, dtype: torch.dtype, device: torch.device) -> str:
        """The route that computes the top-k of these task matrices (see the module docstring)."""
        route = self.topk or os.environ.get("TSV_FAST_TOPK", "auto")
        if route not in TOPK_ROUTES:
            raise ValueError(f"top-k route must be one of {TOPK_ROUTES}, got {route!r} (TSV_FAST_TOPK?)")
        if route == "gram":
            return "gram"
        return "gram" if krylov_unsuitable(shape, k, dtype, device, route) else "krylov"

    def task_factors(self, finetuned: Tensor, pretrained: Tensor | None, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k triplets of every task matrix (never a full SVD), float64.

        finetuned [L, T, m, n], pretrained [L, m, n] or None -> U [L,T,m,k], σ [L,T,k], V [L,T,n,k].
        """
        layers, tasks, m, n = finetuned.shape
        route = self.topk_route((m, n), k, finetuned.dtype, finetuned.device)
        solve = self._krylov_factors if route == "krylov" else self._gram_factors
        parts = _in_parallel(lambda rows: solve(finetuned, pretrained, rows, k), layers * tasks, finetuned.device)
        u, sigma, v = (torch.cat(p) for p in zip(*parts))
        return u.reshape(layers, tasks, m, k), sigma.reshape(layers, tasks, k), v.reshape(layers, tasks, n, k)

    def _gram_factors(self, finetuned: Tensor, pretrained: Tensor | None, rows: list[int], k: int
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """The Gram route for the flat tasks ``rows``: float64 Δ, its smaller-side Gram, top-k eigh."""
        delta = deltas(finetuned, pretrained, rows, F64)
        wide = delta.shape[-2] < delta.shape[-1]
        if wide:  # work on the smaller Gram
            delta = delta.mT
        right = self.topk_eigh(self.task_gram(delta), k)
        return factors_from_projection(delta @ right, right, wide)

    def _krylov_factors(self, finetuned: Tensor, pretrained: Tensor | None, rows: list[int], k: int
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """The Krylov route for the flat tasks ``rows``; uncertified tasks go through the Gram route."""
        delta = deltas(finetuned, pretrained, rows, torch.float32)
        wide = delta.shape[-2] < delta.shape[-1]
        budget = krylov_budget(k, min(delta.shape[-2:]), delta.device)
        u, sigma, v, certified, _ = krylov.krylov_topk(delta.mT if wide else delta, k, dim_limit=budget, seed=rows[0])
        del delta
        if not bool(certified.all()):
            again = (~certified).nonzero().squeeze(-1)
            redo = self._gram_factors(finetuned, pretrained, [rows[i] for i in again.tolist()], k)
            u[again], sigma[again], v[again] = redo if not wide else (redo[2], redo[1], redo[0])
        return (v, sigma, u) if wide else (u, sigma, v)

    def orthogonalize(self, stack: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Polar factor X (XᵀX)^(-1/2) of X [L, m, K] (float64) through its K×K Gram.

        Eigenvalues below GRAM_RTOL·K·λ_max are treated as zero (partial isometry), so a
        rank-deficient stack never produces Inf/NaN. Returns (X⊥, G, eigenvalues of G ascending).
        """
        gram = self.stack_gram(stack)
        evals, evecs = self.eigh(gram)
        floor = GRAM_RTOL * stack.shape[-1] * evals[..., -1:].clamp_min(0)
        inv_sqrt = torch.where(evals > floor, evals.clamp_min(torch.finfo(F64).tiny).rsqrt(), 0.0)
        return stack @ ((evecs * inv_sqrt.unsqueeze(-2)) @ evecs.mT), gram, evals

    def sti(self, gram_u: Tensor, sigma: Tensor, gram_v: Tensor) -> Tensor:
        return sti_ref(gram_u, sigma, gram_v)

    def reconstruct(self, base: Tensor | None, a: Tensor, b: Tensor, alpha: float,
                    out_dtype: torch.dtype) -> Tensor:
        if base is None:
            update = a @ b.mT
            return (update if alpha == 1.0 else update * alpha).to(out_dtype)
        return torch.baddbmm(base.to(a.dtype), a, b.mT, alpha=alpha).to(out_dtype)


class ExactBackend(TorchBackend):
    """``exact=True``: the authors' full-SVD route inside the streaming engine.

    A full SVD of every task matrix and the Procrustes factors by SVD of the stacks, both in the
    compute dtype (float32 reproduces the published numerics, float64 is the oracle at model scale),
    with the reference's conventions for numerically zero triplets and rank-deficient stacks: it calls
    ``reference.topk_svd_ref`` and ``reference.polar_ref`` themselves, batched, so a merge equals
    ``reference.fast_tsv_merge`` at the same dtype. 2.5x slower than the Gram route on CPU.
    """

    name = "exact"

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def task_factors(self, finetuned: Tensor, pretrained: Tensor | None, k: int) -> tuple[Tensor, Tensor, Tensor]:
        delta = finetuned.to(self.dtype, copy=True)
        if pretrained is not None:
            delta.sub_(pretrained.to(self.dtype).unsqueeze(1))
        return tuple(t.to(F64) for t in topk_svd_ref(delta, k))  # batched over layers and tasks

    def orthogonalize(self, stack: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``reference.polar_ref`` (batched SVD in the compute dtype); the float64 Gram (for STI)
        and its eigenvalues (for κ and the numerical rank) come along, as in the Gram route."""
        gram = self.stack_gram(stack)
        return polar_ref(stack.to(self.dtype)).to(F64), gram, torch.linalg.eigvalsh(gram)
