"""The cuSOLVER backend: the torch route with its eigensolvers (and optionally the top-k SVD)
replaced by the batched cuSOLVER calls of the compiled extension ``tsv_fast._C`` (csrc/).

Replaced ops:
* ``eigh`` (the per-task Grams [L, T, n, n] and the stack Grams [L, K, K], float64): one batched
  call: syevjBatched for n <= 32, cusolverDnXsyevBatched where the build has it (CUDA >= 12.6u2),
  else a loop of Xsyevd on one stream. Eigenvalues ascending, like torch.linalg.eigh.
* ``task_factors`` when ``factor_route="svd"``: top-k of every Δ straight from
  gesvdaStridedBatched (float64), whose residual norms are checked. The default route stays the
  float64 Gram + eigh of DESIGN.md §2, whose accuracy the tests pin down.

The module imports without the extension; ``tsv_fast._C`` is imported on first use only, and
``unavailable_reasons`` says why it is missing (from tsv_fast/_build_info.json, written by
setup.py). Functions for direct use: ``batched_topk_svd`` and ``batched_eigh``.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import Tensor

from ..reference import ZERO_RTOL
from .torch_backend import F64, TorchBackend

SVD_METHODS = ("auto", "gesvda", "gesvdj_batched", "gesvdj", "gesvd", "gesvdp", "gesvdr")
EIGH_METHODS = ("auto", "syevj_batched", "syev_batched", "syevd")
SUPPORTED_DTYPES = (torch.float32, torch.float64)

_BUILD_INFO = Path(__file__).resolve().parents[1] / "_build_info.json"
_extension = None  # the imported module, once loaded
_extension_error: str | None = None  # why it could not be loaded, once tried


def build_info() -> dict:
    """What setup.py recorded about the extension build ({} when there is no record)."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def extension_unavailable_reason() -> str | None:
    """None when ``tsv_fast._C`` imports, else a sentence saying why not. Imports it (once)."""
    global _extension, _extension_error
    if _extension is not None or _extension_error is not None:
        return _extension_error
    try:
        _extension = importlib.import_module("tsv_fast._C")
        return None
    except ImportError as exc:
        info = build_info()
        if not info:
            _extension_error = ("tsv_fast._C is not built and no build record exists (running from a "
                                "source tree? build with `pip install --no-build-isolation .` on a "
                                "machine with a CUDA build of torch and nvcc)")
        elif not info.get("built"):
            _extension_error = f"tsv_fast._C was not built: {info.get('reason', 'no reason recorded')}"
        else:
            _extension_error = f"tsv_fast._C was built but does not import: {exc}"
        return _extension_error


def _ext():
    reason = extension_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cusolver backend unavailable: {reason}")
    return _extension


def _check_input(A: Tensor, fn: str, square: bool = False) -> None:
    if not isinstance(A, Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"{fn}: expected matrices [..., m, n], got shape {tuple(A.shape)}")
    if not A.is_cuda:
        raise ValueError(f"{fn}: expected a CUDA tensor, got one on {A.device}")
    if A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: expected float32 or float64, got {A.dtype} (cast bf16/fp16 to float32 first)")
    if square and A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{fn}: expected square matrices [..., n, n], got shape {tuple(A.shape)}")


def _as_batch(A: Tensor) -> Tensor:
    """[..., m, n] -> [B, m, n] without a copy when the matrices are row- or column-major."""
    m, n = A.shape[-2:]
    if A.dim() == 3:
        return A
    if A.dim() == 2:
        return A.unsqueeze(0)
    try:
        return A.view(-1, m, n)
    except RuntimeError:  # a column-major batch: flatten its transpose, transpose back
        try:
            return A.mT.view(-1, n, m).mT
        except RuntimeError:
            return A.reshape(-1, m, n)


def batched_topk_svd(A: Tensor, k: int, method: str = "auto", *, check: bool = True,
                     residual_rtol: float | None = None, oversample: int | None = None,
                     niters: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of every matrix of A [..., m, n] (float32/float64, CUDA).

    Returns U [..., m, k], S [..., k] (descending), V [..., n, k] with A ≈ U diag(S) Vᵀ; U and V
    may be transposed (non-contiguous) views. ``method``: "auto" (gesvdjBatched up to 32 x 32,
    else gesvdaStridedBatched), "gesvda", "gesvdj_batched", "gesvdj" (loop), "gesvd" (loop of
    Xgesvd), "gesvdp" (loop of Xgesvdp: polar decomposition + Xsyevd, its error estimates are
    checked to be finite) or "gesvdr" (loop of the randomized Xgesvdr with a block of k +
    ``oversample`` columns, default 2k, and ``niters`` power iterations). With ``check`` a nonzero per-matrix ``info`` raises, naming the matrix, and gesvda's
    residual norms are checked: ‖residual‖ <= tail + rtol·‖A‖_F, tail = sqrt(‖A‖² − ‖S‖²) being
    the least residual any rank-k factorisation has (so the check holds whether cuSOLVER reports
    ‖A − U S Vᵀ‖_F or ‖Uᵀ A V − S‖_F).

    Example::

        U, S, V = batched_topk_svd(torch.randn(8, 768, 3072, device="cuda", dtype=torch.float64), 96)
    """
    fn = "batched_topk_svd"
    _check_input(A, fn)
    if method not in SVD_METHODS:
        raise ValueError(f"{fn}: unknown method {method!r}; choose one of {SVD_METHODS}")
    m, n = A.shape[-2:]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"{fn}: k must satisfy 1 <= k <= min(m, n) = {min(m, n)}, got {k}")
    lead = A.shape[:-2]
    batch = _as_batch(A)
    U, S, V, _info, residual = _ext().batched_svd(batch, int(k), method, check, check,
                                                  -1 if oversample is None else int(oversample),
                                                  int(niters))
    resolved = method if method != "auto" else ("gesvdj_batched" if m <= 32 and n <= 32 else "gesvda")
    if check and resolved == "gesvda" and residual.numel():
        _check_residuals(batch, S, residual, residual_rtol)
    return U.reshape(*lead, m, k), S.reshape(*lead, k), V.reshape(*lead, n, k)


def _check_residuals(A: Tensor, S: Tensor, residual: Tensor, rtol: float | None) -> None:
    if rtol is None:  # the tail is a difference of squares: only sqrt(eps)-accurate
        rtol = 1e-2 if A.dtype == torch.float32 else 1e-5
    norm_a = torch.linalg.matrix_norm(A.to(F64)).cpu()
    tail = (norm_a.square() - S.to(F64).square().sum(-1).cpu()).clamp_min(0).sqrt()
    bad = residual > tail + rtol * norm_a
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise RuntimeError(
            f"batched_topk_svd: gesvda's residual norm {residual[i].item():.3e} for matrix {i} of the "
            f"batch exceeds tail {tail[i].item():.3e} + {rtol:g}·‖A‖_F ({norm_a[i].item():.3e}); "
            f"{int(bad.sum())} of {bad.numel()} matrices failed. gesvda is inaccurate for "
            "ill-conditioned or nearly singular inputs: use method='gesvdj' or 'gesvd'")


def batched_eigh(A: Tensor, method: str = "auto", *, lower: bool = True,
                 check: bool = True) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of every symmetric matrix of A [..., n, n].

    Semantics of torch.linalg.eigh (only the lower triangle is read, ``lower=False`` reads the
    upper one). ``method``: "auto", "syevj_batched" (n <= 32), "syev_batched"
    (cusolverDnXsyevBatched, CUDA >= 12.6u2) or "syevd" (loop). Returns (evals [..., n],
    evecs [..., n, n]); evecs is a transposed (non-contiguous) view.
    """
    fn = "batched_eigh"
    _check_input(A, fn, square=True)
    if method not in EIGH_METHODS:
        raise ValueError(f"{fn}: unknown method {method!r}; choose one of {EIGH_METHODS}")
    n = A.shape[-1]
    lead = A.shape[:-2]
    evals, evecs, _info = _ext().batched_eigh(_as_batch(A), method, lower, check)
    return evals.reshape(*lead, n), evecs.reshape(*lead, n, n)


class CusolverBackend(TorchBackend):
    """TorchBackend with cuSOLVER's batched eigensolvers (and optionally its batched top-k SVD)."""

    name = "cusolver"
    topk = "gram"  # its factor_route "gram" means the Gram route with cuSOLVER's eigensolvers

    def __init__(self, factor_route: str = "gram", eigh_method: str = "auto") -> None:
        if factor_route not in ("gram", "svd"):
            raise ValueError(f"factor_route must be 'gram' or 'svd', got {factor_route!r}")
        if eigh_method not in EIGH_METHODS:
            raise ValueError(f"eigh_method must be one of {EIGH_METHODS}, got {eigh_method!r}")
        self.factor_route = factor_route
        self.eigh_method = eigh_method

    def unavailable_reasons(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        device = torch.device(device)
        reasons = []
        if device.type != "cuda":
            reasons.append(f"cusolver: needs a CUDA device, got {device}")
        elif not torch.cuda.is_available():
            reasons.append("cusolver: torch sees no CUDA device")
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            reasons.append(f"cusolver: supports float32/float64, got {dtype}")
        if device.type == "cuda":
            ext_reason = extension_unavailable_reason()
        else:  # say why the extension is missing without importing it on a CPU-only request
            info = build_info()
            ext_reason = None if info.get("built") else (
                f"tsv_fast._C was not built: {info['reason']}" if info else
                "tsv_fast._C is not built and no build record exists")
        if ext_reason:
            reasons.append(f"cusolver: {ext_reason}")
        return reasons

    def eigh(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        if not gram.is_cuda or gram.dtype not in SUPPORTED_DTYPES or gram.numel() == 0:
            return super().eigh(gram)
        return batched_eigh(gram, self.eigh_method)

    def task_factors(self, finetuned: Tensor, pretrained: Tensor | None, k: int) -> tuple[Tensor, Tensor, Tensor]:
        m, n = finetuned.shape[-2:]
        if self.factor_route == "gram" or not finetuned.is_cuda or not 1 <= k <= min(m, n):
            return super().task_factors(finetuned, pretrained, k)
        delta = finetuned.to(F64)
        if pretrained is not None:
            delta = delta - pretrained.to(F64).unsqueeze(1)
        u, sigma, v = batched_topk_svd(delta, k, "gesvda")
        # Same contract as the torch route: numerically zero triplets become zero columns.
        keep = sigma > ZERO_RTOL * sigma.amax(dim=-1, keepdim=True)
        sigma = sigma * keep
        return u * keep.unsqueeze(-2), sigma, v * keep.unsqueeze(-2)
