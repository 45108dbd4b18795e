"""The cuSOLVER backend: the torch route with its eigensolvers (and optionally the top-k SVD)
replaced by the batched cuSOLVER calls of the compiled extension ``tsv_fast._C`` (csrc/).

Replaced ops:
* ``eigh`` (the per-task Grams [L, T, n, n] and the stack Grams [L, K, K], float64): one batched
  call: syevjBatched for n <= 32, cusolverDnXsyevBatched where the build has it (CUDA >= 12.6u2),
  else a loop of Xsyevd on one stream. Eigenvalues ascending, like torch.linalg.eigh.
* ``task_factors`` when ``factor_route="svd"``: top-k of every Δ straight from
  gesvdaStridedBatched (float64), whose factors are checked (``check_topk_factors``). The default
  route stays the float64 Gram + eigh of DESIGN.md §2, whose accuracy the tests pin down.

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
INT32_MAX = 2**31 - 1

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


def check_finite(A: Tensor, fn: str) -> None:
    """Raise, naming the first matrix of A [B, m, n] that holds NaN or Inf (one reduction, one
    sync): what a solver makes of such input varies by routine, from NaN factors to info > 0."""
    bad = ~torch.isfinite(A).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{fn}: matrix {int(bad.nonzero()[0])} of the batch contains NaN or Inf "
                         f"({int(bad.sum())} of {bad.numel()} matrices)")


def _limit(max_batch_elements: int | None) -> int:
    return INT32_MAX if max_batch_elements is None else int(max_batch_elements)


def batched_topk_svd(A: Tensor, k: int, method: str = "auto", *, check: bool = True, return_info: bool = False,
                     rtol: float | None = None, oversample: int | None = None, niters: int = 10,
                     max_batch_elements: int | None = None):
    """Top-k singular triplets of every matrix of A [..., m, n] (float32/float64, CUDA).

    Returns U [..., m, k], S [..., k] (descending), V [..., n, k] with A ≈ U diag(S) Vᵀ (U and V
    may be transposed, non-contiguous views), plus the per-matrix cuSOLVER ``info`` [...] (int32,
    on the device) when ``return_info``. ``method``: "auto" (gesvdjBatched up to 32 x 32, else
    gesvdaStridedBatched), "gesvda", "gesvdj_batched", "gesvdj" (loop), "gesvd" (loop of Xgesvd),
    "gesvdp" (loop of Xgesvdp: polar decomposition + Xsyevd, error estimates checked finite) or
    "gesvdr" (loop of the randomized Xgesvdr, k < min(m, n), a block of k + ``oversample``
    columns, default min(k, min(m, n) - k - 1), and ``niters`` power iterations).

    With ``check`` (default) non-finite input and a failed ``info`` raise, naming the matrix, and
    the factors of the approximate routines (gesvda, gesvdr) are verified by ``check_topk_factors``
    with ``rtol``.
    ``check=False`` skips both and needs ``return_info=True``: the caller then owns ``info``
    (gesvda: min(m, n) + 1 = not converged, 0 < info <= min(m, n) = partial result).
    ``max_batch_elements`` (tests only) lowers the 32-bit bound at which batches are split.

    Example::

        U, S, V = batched_topk_svd(torch.randn(8, 768, 3072, device="cuda", dtype=torch.float64), 96)
    """
    fn = "batched_topk_svd"
    if not check and not return_info:
        raise ValueError(f"{fn}: check=False would drop the per-matrix info; pass return_info=True and "
                         "inspect it")
    _check_input(A, fn)
    if method not in SVD_METHODS:
        raise ValueError(f"{fn}: unknown method {method!r}; choose one of {SVD_METHODS}")
    m, n = A.shape[-2:]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"{fn}: k must satisfy 1 <= k <= min(m, n) = {min(m, n)}, got {k}")
    lead = A.shape[:-2]
    batch = _as_batch(A)
    if check:
        check_finite(batch, fn)
    U, S, V, info, _err = _ext().batched_svd(batch, int(k), method, check,
                                             -1 if oversample is None else int(oversample), int(niters),
                                             _limit(max_batch_elements))
    resolved = method if method != "auto" else ("gesvdj_batched" if m <= 32 and n <= 32 else "gesvda")
    if check and resolved in ("gesvda", "gesvdr"):
        check_topk_factors(batch, U, S, V, rtol, routine=resolved)
    out = (U.reshape(*lead, m, k), S.reshape(*lead, k), V.reshape(*lead, n, k))
    return (*out, info.reshape(lead)) if return_info else out


def check_topk_factors(A: Tensor, U: Tensor, S: Tensor, V: Tensor, rtol: float | None = None, *,
                       routine: str = "svd") -> None:
    """Raise unless (U, S, V) are singular triplets of every A [B, m, n] to within ``rtol``.

    Checked per matrix, all relative to ‖A‖_F (σ₁ for the weights): S finite, non-negative and
    descending; ‖A V − U diag(S)‖_F and ‖(Aᵀ U − V diag(S)) diag(S/σ₁)‖_F ≤ rtol; VᵀV = I and
    (UᵀU − I) ∘ (S Sᵀ/σ₁²) = 0 to rtol (max entry). The weights spare the left vectors of
    (numerically) zero singular values, which no routine defines. One host sync. Default rtol:
    1e-3 for float32, 1e-6 for float64 (gesvda is documented as approximate).
    """
    if rtol is None:
        rtol = 1e-3 if A.dtype == torch.float32 else 1e-6
    A, U, S, V = A.to(F64), U.to(F64), S.to(F64), V.to(F64)
    norm_a = torch.linalg.matrix_norm(A).clamp_min(torch.finfo(F64).tiny)
    top = S[..., :1].clamp_min(torch.finfo(F64).tiny)
    weight = S / top
    eye = torch.eye(S.shape[-1], dtype=F64, device=S.device)
    right = torch.linalg.matrix_norm(A @ V - U * S.unsqueeze(-2)) / norm_a
    left = torch.linalg.matrix_norm((A.mT @ U - V * S.unsqueeze(-2)) * weight.unsqueeze(-2)) / norm_a
    orth_v = (V.mT @ V - eye).abs().amax(dim=(-2, -1))
    orth_u = ((U.mT @ U - eye) * (weight.unsqueeze(-1) * weight.unsqueeze(-2))).abs().amax(dim=(-2, -1))
    order = (S[..., 1:] > S[..., :-1] * (1 + rtol) + rtol * top).any(dim=-1) | (S < 0).any(dim=-1)
    worst = torch.stack([right, left, orth_v, orth_u]).amax(dim=0)
    bad = ~(worst <= rtol) | order | ~torch.isfinite(S).all(dim=-1)  # NaN compares False: bad
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise RuntimeError(
            f"batched_topk_svd: {routine} returned inaccurate factors for matrix {i} of the batch "
            f"(relative residuals ‖AV−US‖ {right[i].item():.2e}, ‖AᵀU−VS‖ {left[i].item():.2e}, "
            f"orthonormality of V {orth_v[i].item():.2e}, of U {orth_u[i].item():.2e}, bound {rtol:g}; "
            f"S ordered and non-negative: {not bool(order[i])}); {int(bad.sum())} of {bad.numel()} matrices "
            "failed. Non-finite or nearly singular inputs are the usual cause: use method='gesvdj' or 'gesvd'")


def batched_eigh(A: Tensor, method: str = "auto", *, lower: bool = True, check: bool = True,
                 return_info: bool = False, max_batch_elements: int | None = None):
    """Eigenvalues (ascending) and eigenvectors of every symmetric matrix of A [..., n, n].

    Semantics of torch.linalg.eigh (only the lower triangle is read, ``lower=False`` reads the
    upper one). ``method``: "auto", "syevj_batched" (n <= 32), "syev_batched"
    (cusolverDnXsyevBatched with its consistent algorithm ALG_1, CUDA >= 12.6u2) or "syevd" (loop).
    Returns (evals [..., n], evecs [..., n, n]) and, with ``return_info``, the per-matrix info [...];
    evecs is a transposed (non-contiguous) view. ``check=False`` (no info check, no sync) needs
    ``return_info=True``.
    """
    fn = "batched_eigh"
    if not check and not return_info:
        raise ValueError(f"{fn}: check=False would drop the per-matrix info; pass return_info=True and "
                         "inspect it")
    _check_input(A, fn, square=True)
    if method not in EIGH_METHODS:
        raise ValueError(f"{fn}: unknown method {method!r}; choose one of {EIGH_METHODS}")
    n = A.shape[-1]
    lead = A.shape[:-2]
    batch = _as_batch(A)
    if check:
        check_finite(batch.tril() if lower else batch.triu(), fn)  # only that triangle is read
    evals, evecs, info = _ext().batched_eigh(batch, method, lower, check, _limit(max_batch_elements))
    out = (evals.reshape(*lead, n), evecs.reshape(*lead, n, n))
    return (*out, info.reshape(lead)) if return_info else out


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
        # Same contract as the torch route: numerically zero triplets become zero columns (where,
        # not a product: the vectors of a zero singular value are not defined).
        keep = sigma > ZERO_RTOL * sigma.amax(dim=-1, keepdim=True)
        zero = torch.zeros((), dtype=sigma.dtype, device=sigma.device)
        return (torch.where(keep.unsqueeze(-2), u, zero), torch.where(keep, sigma, zero),
                torch.where(keep.unsqueeze(-2), v, zero))
