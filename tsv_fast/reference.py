"""The plain torch path: TSV as the paper writes it, readable top to bottom.

This module is the oracle of every test and the twin of every fast op. It favours clarity over
speed: one full SVD per task, Procrustes by SVD, Python loops over keys and tasks. Every function
runs on any device and in float64 (``compute_dtype=torch.float64``).

Semantics follow the authors (Gargiulo et al., CVPR 2025, Algorithm 1 and Eqs. 5, 7, 8):

* rank per task ``k = int(r * rank_fraction)`` with ``r = min(m, n)`` and ``rank_fraction = 1/T``;
* 2-D parameters whose name contains an ``exclude`` pattern, and every non-2-D parameter, get the
  arithmetic mean of the task vectors;
* a layer with ``k == 0`` (``r < T``) gets no matrix update (the authors' result), unless ``min_rank``
  asks for more.

One convention goes beyond the paper, where the paper's result is undefined: singular triplets that
are numerically zero (``sigma <= ZERO_RTOL * sigma_1`` of their task) are dropped, and the polar
factor is the partial isometry on the numerical range of the stack. The authors' code fills those
directions with arbitrary singular vectors, which changes M arbitrarily when two tasks are identical
or a task matrix is rank-deficient; with this convention merging two identical tasks returns that task.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .options import is_merged_as_matrix, rank_per_task  # noqa: F401 - the rules, re-exported

#: Singular values below this fraction of their task's largest are treated as exact zeros.
ZERO_RTOL = 1e-6
#: Eigenvalues of a stack Gram below ``GRAM_RTOL * dim * largest`` are treated as zeros.
GRAM_RTOL = 1e-15


# ----------------------------------------------------------------------------------------------
# Rules shared by every path
# ----------------------------------------------------------------------------------------------
def iso_cts_split(rank: int, num_tasks: int, common_space_fraction: float = 0.8) -> tuple[int, int]:
    """Iso-CTS sizes for a matrix of rank r = min(m, n): (common directions, directions per task).

    The authors' rule: common = int(f · r); the task-specific total (r − common) is rounded to a
    multiple of T with Python's round (half to even) and common takes the rest, so that
    common + T · per_task = r. Where that total would exceed r (tiny r, large T, small f; their code
    breaks there) it is rounded down instead.
    """
    common = int(rank * common_space_fraction)
    specific = round((rank - common) / num_tasks) * num_tasks
    if specific > rank:
        specific = (rank // num_tasks) * num_tasks
    return rank - specific, specific // num_tasks


# ----------------------------------------------------------------------------------------------
# Twins of the fused kernels (tsv_fast.kernels): same signatures, plain torch
# ----------------------------------------------------------------------------------------------
def task_gram_ref(finetuned: Tensor, pretrained: Tensor | None = None, *,
                  out_dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-task Gram on the smaller side of Δ = finetuned - pretrained.

    finetuned: [..., T, m, n]; pretrained: [..., m, n] or None (then finetuned already holds Δ).
    Returns [..., T, n, n] = ΔᵀΔ when m >= n, else [..., T, m, m] = ΔΔᵀ, accumulated in ``out_dtype``.
    """
    delta = finetuned.to(out_dtype)
    if pretrained is not None:
        delta = delta - pretrained.to(out_dtype).unsqueeze(-3)
    if delta.shape[-2] >= delta.shape[-1]:
        return delta.mT @ delta
    return delta @ delta.mT


def stack_gram_ref(stack: Tensor, *, out_dtype: torch.dtype = torch.float64) -> Tensor:
    """G = XᵀX of a factor stack X: [..., m, K] -> [..., K, K]."""
    x = stack.to(out_dtype)
    return x.mT @ x


def sti_ref(gram_u: Tensor, sigma: Tensor, gram_v: Tensor) -> Tensor:
    """Singular Task Interference (Eq. 7): Σ |(G_U - I) diag(σ) (G_V - I)|, entrywise L1.

    gram_u, gram_v: [..., K, K]; sigma: [..., K]. Returns [...] (one scalar per layer).
    """
    eye = torch.eye(gram_u.shape[-1], dtype=gram_u.dtype, device=gram_u.device)
    product = (gram_u - eye) @ (sigma.to(gram_u.dtype).unsqueeze(-1) * (gram_v.to(gram_u.dtype) - eye))
    return product.abs().sum(dim=(-2, -1))


def reconstruct_ref(base: Tensor | None, a: Tensor, b: Tensor, *, alpha: float = 1.0,
                    out_dtype: torch.dtype | None = None) -> Tensor:
    """W = base + alpha · A Bᵀ, computed in A's dtype, cast once to ``out_dtype``.

    base: [..., m, n] or None; a: [..., m, K] (= U⊥ diag σ); b: [..., n, K] (= V⊥).
    """
    update = a @ b.mT
    if alpha != 1.0:
        update = update * alpha
    if base is not None:
        update = base.to(update.dtype) + update
    return update.to(out_dtype or (base.dtype if base is not None else a.dtype))


# ----------------------------------------------------------------------------------------------
# The linear algebra of one layer
# ----------------------------------------------------------------------------------------------
def topk_svd_ref(delta: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets by a full SVD: U [..., m, k], σ [..., k], V [..., n, k] of [..., m, n].

    Numerically zero triplets (σ <= ZERO_RTOL · σ₁) come back as zero columns with σ = 0.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, s, v = u[..., :k], s[..., :k], vh[..., :k, :].mT
    keep = s > ZERO_RTOL * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    return u * keep.unsqueeze(-2), s * keep, v * keep.unsqueeze(-2)


def drop_small(u: Tensor, sigma: Tensor, v: Tensor, floor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero the triplets with σ <= ``floor`` (broadcast over the last axis of σ [..., k]).

    For the factors of a residual (Δ minus its part inside a subspace), whose own σ₁ may be pure
    rounding: its triplets are judged against the task's scale, ZERO_RTOL · ‖Δ‖_F, instead.
    """
    keep = sigma > floor.unsqueeze(-1)
    return u * keep.unsqueeze(-2), sigma * keep, v * keep.unsqueeze(-2)


def polar_ref(stack: Tensor) -> Tensor:
    """Orthogonal Procrustes / polar factor of X [..., m, K]: P Qᵀ from X = P D Qᵀ.

    Restricted to the numerical range of X (a partial isometry), so zero or repeated columns map to
    zero instead of to arbitrary directions. The range is judged at the precision of X's dtype: in
    float32 a duplicated column leaves a singular value of rounding size, measured ≤ 7e-7 · d₁ for
    stacks up to 3072 × 768, so 64 ε (7.6e-6) separates it from real near-dependencies (4e-5 · d₁
    seen in Iso-CTS stacks, which every isotropic merge weighs fully).
    """
    p, d, qh = torch.linalg.svd(stack, full_matrices=False)
    width = max(stack.shape[-1], 1)
    rtol = max((GRAM_RTOL * width) ** 0.5, 64 * torch.finfo(stack.dtype).eps)
    keep = d > rtol * d[..., :1]
    return (p * keep.unsqueeze(-2)) @ qh


def _task_vectors_from(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]],
                       compute_dtype: torch.dtype) -> list[dict[str, Tensor]]:
    return [{key: ft[key].to(compute_dtype) - pretrained[key].to(compute_dtype) for key in pretrained}
            for ft in finetuned]


def _check_same_layout(task_vectors: Sequence[Mapping[str, Tensor]]) -> None:
    if len(task_vectors) == 0:
        raise ValueError("need at least one task vector")
    first = task_vectors[0]
    for i, tv in enumerate(task_vectors[1:], start=1):
        if set(tv) != set(first):
            raise ValueError(f"task vector {i} has different keys than task vector 0: "
                             f"{sorted(set(tv) ^ set(first))[:5]}")
        for key in first:
            if tv[key].shape != first[key].shape:
                raise ValueError(f"key {key!r}: shape {tuple(tv[key].shape)} in task vector {i} "
                                 f"but {tuple(first[key].shape)} in task vector 0")


def layer_factors_ref(deltas: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenated top-k factors of one layer: U [m, Tk], σ [Tk], V [n, Tk]."""
    factors = [topk_svd_ref(d, k) for d in deltas]
    return (torch.cat([f[0] for f in factors], dim=1), torch.cat([f[1] for f in factors]),
            torch.cat([f[2] for f in factors], dim=1))


# ----------------------------------------------------------------------------------------------
# Public twins: same signatures as tsv_fast's fast API
# ----------------------------------------------------------------------------------------------
def fast_tsv_merge(task_vectors: Sequence[Mapping[str, Tensor]], *, rank_fraction: float | None = None,
                   exclude: Sequence[str] = ("text_projection",), compute_dtype: torch.dtype = torch.float32,
                   min_rank: int = 0, **_ignored) -> dict[str, Tensor]:
    """TSV-M merged task vector M (Algorithm 1, α not applied), one key at a time.

    task_vectors: T dicts key -> Δᵢ with equal keys and shapes. Output keeps the input dtype.
    """
    _check_same_layout(task_vectors)
    num_tasks = len(task_vectors)
    merged: dict[str, Tensor] = {}
    zero_rank = []
    for key, first in task_vectors[0].items():
        deltas = [tv[key].to(compute_dtype) for tv in task_vectors]
        if not is_merged_as_matrix(key, first.shape, exclude):
            merged[key] = (sum(deltas) / num_tasks).to(first.dtype)
            continue
        k = rank_per_task(first.shape, num_tasks, rank_fraction, min_rank)
        if k == 0:
            merged[key] = torch.zeros_like(first)
            zero_rank.append(key)
            continue
        u, s, v = layer_factors_ref(deltas, k)
        merged[key] = (polar_ref(u) @ torch.diag(s) @ polar_ref(v).mT).to(first.dtype)
    warn_zero_rank(zero_rank)
    return merged


def tsv_merge(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], *,
              alpha: float = 1.0, compute_dtype: torch.dtype = torch.float32, **options) -> dict[str, Tensor]:
    """Merged weights W_pre + α·M for every key of ``pretrained``, in the pretrained dtype."""
    merged = fast_tsv_merge(_task_vectors_from(pretrained, finetuned, compute_dtype),
                            compute_dtype=compute_dtype, **options)
    return {key: (pretrained[key].to(compute_dtype) + alpha * merged[key]).to(pretrained[key].dtype)
            for key in pretrained}


def task_arithmetic(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], *,
                    alpha: float = 1.0, compute_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Task Arithmetic baseline: W_pre + α Σᵢ Δᵢ."""
    deltas = _task_vectors_from(pretrained, finetuned, compute_dtype)
    return {key: (pretrained[key].to(compute_dtype) + alpha * sum(d[key] for d in deltas))
            .to(pretrained[key].dtype) for key in pretrained}


def compress(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], *,
             rank_fraction: float | None = None, exclude: Sequence[str] = ("text_projection",),
             compute_dtype: torch.dtype = torch.float32, min_rank: int = 0, **_ignored) -> list[dict]:
    """TSV-C (Eqs. 5/8): per task, key -> (Uᵢ, σᵢ, Vᵢ) for matrices, key -> Δᵢ for the rest."""
    deltas = _task_vectors_from(pretrained, finetuned, compute_dtype)
    num_tasks = len(deltas)
    tasks = []
    for delta in deltas:
        entry = {}
        for key, d in delta.items():
            if is_merged_as_matrix(key, d.shape, exclude):
                entry[key] = topk_svd_ref(d, rank_per_task(d.shape, num_tasks, rank_fraction, min_rank))
            else:
                entry[key] = d
        tasks.append(entry)
    return tasks


def reconstruct(pretrained: Mapping[str, Tensor], compressed_task: Mapping[str, object]) -> dict[str, Tensor]:
    """One task back from its TSV-C entry: W_pre + Uᵢ diag(σᵢ) Vᵢᵀ (other params: W_pre + Δᵢ)."""
    out = {}
    for key, value in compressed_task.items():
        base = pretrained[key]
        if isinstance(value, tuple):
            u, s, v = value
            delta = (u * s) @ v.mT
        else:
            delta = value
        out[key] = (base.to(delta.dtype) + delta).to(base.dtype)
    return out


def interference(task_vectors: Sequence[Mapping[str, Tensor]], *, rank_fraction: float | None = None,
                 exclude: Sequence[str] = ("text_projection",), compute_dtype: torch.dtype = torch.float64,
                 orthogonalized: bool = False, min_rank: int = 0, **_ignored) -> dict[str, float]:
    """STI per matrix key (Eq. 7). With ``orthogonalized`` the stacks are replaced by U⊥, V⊥ (after TSV-M)."""
    _check_same_layout(task_vectors)
    num_tasks = len(task_vectors)
    result = {}
    for key, first in task_vectors[0].items():
        if not is_merged_as_matrix(key, first.shape, exclude):
            continue
        k = rank_per_task(first.shape, num_tasks, rank_fraction, min_rank)
        if k == 0:
            continue
        u, s, v = layer_factors_ref([tv[key].to(compute_dtype) for tv in task_vectors], k)
        if orthogonalized:
            u, v = polar_ref(u), polar_ref(v)
        result[key] = float(sti_ref(u.mT @ u, s, v.mT @ v))
    return result


def iso_c(task_vectors: Sequence[Mapping[str, Tensor]], *, exclude: Sequence[str] = ("text_projection",),
          compute_dtype: torch.dtype = torch.float32, **_ignored) -> dict[str, Tensor]:
    """Iso-C merged task vector M (α not applied): per matrix, the SVD of S = Σₜ Δₜ with every one of
    its r = min(m, n) singular values replaced by their mean, M = mean(σ) · U Vᵀ; other keys: the mean
    task vector. Numerically zero triplets of S (σ <= ZERO_RTOL σ₁) count as zeros in the mean and
    add no direction (the authors' code would add arbitrary ones there)."""
    _check_same_layout(task_vectors)
    merged = {}
    for key, first in task_vectors[0].items():
        deltas = [tv[key].to(compute_dtype) for tv in task_vectors]
        if not is_merged_as_matrix(key, first.shape, exclude):
            merged[key] = (sum(deltas) / len(deltas)).to(first.dtype)
            continue
        r = min(first.shape)
        u, s, v = topk_svd_ref(sum(deltas), r)
        merged[key] = ((s.sum() / r) * (u @ v.mT)).to(first.dtype)
    return merged


def iso_cts(task_vectors: Sequence[Mapping[str, Tensor]], *, common_space_fraction: float = 0.8,
            exclude: Sequence[str] = ("text_projection",), compute_dtype: torch.dtype = torch.float32,
            **_ignored) -> dict[str, Tensor]:
    """Iso-CTS merged task vector M (α not applied). Per matrix: (common, s) = iso_cts_split(r, T, f);
    the top-common triplets (U_c, σ_c, V_c) of S = Σₜ Δₜ; per task the top-s triplets of its left
    residual Δₜ − U_c U_cᵀ Δₜ; M = mean(all r stacked σ) · polar([U₁ … U_T, U_c]) polar([V₁ … V_T, V_c])ᵀ.
    Other keys: the mean task vector."""
    _check_same_layout(task_vectors)
    num_tasks = len(task_vectors)
    merged = {}
    for key, first in task_vectors[0].items():
        deltas = [tv[key].to(compute_dtype) for tv in task_vectors]
        if not is_merged_as_matrix(key, first.shape, exclude):
            merged[key] = (sum(deltas) / num_tasks).to(first.dtype)
            continue
        r = min(first.shape)
        common, per_task = iso_cts_split(r, num_tasks, common_space_fraction)
        parts = []
        u_c = None
        if common:
            u_c, s_c, v_c = topk_svd_ref(sum(deltas), common)
        if per_task:  # each task's directions outside the common subspace, at the task's own scale
            residuals = [d - u_c @ (u_c.mT @ d) if u_c is not None else d for d in deltas]
            factors = [drop_small(*topk_svd_ref(res, per_task), ZERO_RTOL * torch.linalg.matrix_norm(d))
                       for res, d in zip(residuals, deltas)]
            parts.append(tuple(torch.cat(f, dim=-1) for f in zip(*factors)))
        if common:
            parts.append((u_c, s_c, v_c))
        u, s, v = (torch.cat(p, dim=-1) for p in zip(*parts))
        merged[key] = ((s.sum() / r) * (polar_ref(u) @ polar_ref(v).mT)).to(first.dtype)
    return merged


# ----------------------------------------------------------------------------------------------
# The authors' algorithm as their code runs it (zero-padded stacks), for tests and benchmarks
# ----------------------------------------------------------------------------------------------
def authors_fast_tsv_merge(task_vectors: Sequence[Mapping[str, Tensor]], *,
                           exclude: Sequence[str] = ("text_projection",),
                           compute_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The published route, re-implemented from its description (DESIGN.md §1-2).

    Per matrix: a full SVD of every Δᵢ; the top k = int(r/T) columns written into zero-padded
    m×r, r, r×n buffers; two SVDs of those buffers for the Procrustes factors; M = Pᵤ Qᵤᵀ diag(s)
    Pᵥ Qᵥᵀ. Non-matrix keys: running mean. No rank guard: it is the baseline, not the oracle.
    """
    num_tasks = len(task_vectors)
    merged = {}
    for key, first in task_vectors[0].items():
        if not is_merged_as_matrix(key, first.shape, exclude):
            mean = task_vectors[0][key].to(compute_dtype).clone()
            for i, tv in enumerate(task_vectors[1:], start=2):
                mean += (tv[key].to(compute_dtype) - mean) / i
            merged[key] = mean.to(first.dtype)
            continue
        r = min(first.shape)
        k = int(r * (1 / num_tasks))
        sum_u = sum_s = sum_vh = None
        for i, tv in enumerate(task_vectors):
            u, s, vh = torch.linalg.svd(tv[key].to(compute_dtype), full_matrices=False)
            if sum_u is None:
                sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
            sum_u[:, i * k:(i + 1) * k] = u[:, :k]
            sum_s[i * k:(i + 1) * k] = s[:k]
            sum_vh[i * k:(i + 1) * k, :] = vh[:k, :]
        pu, _, qhu = torch.linalg.svd(sum_u, full_matrices=False)
        pv, _, qhv = torch.linalg.svd(sum_vh, full_matrices=False)
        merged[key] = torch.linalg.multi_dot((pu, qhu, torch.diag(sum_s), pv, qhv)).to(first.dtype)
    return merged


def warn_zero_rank(keys: Sequence[str]) -> None:
    """Warn once per call about layers that get no matrix update (k = 0), naming them."""
    if keys:
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        warnings.warn(f"{len(keys)} matrix layer(s) have min(m, n) * rank_fraction < 1, so k = 0 and they "
                      f"get no matrix update (as in the authors' code): {shown}. Pass min_rank=1 (command line: "
                      f"--min-rank 1, YAML: min_rank: 1) to keep at least one singular triplet per task.", stacklevel=3)
