"""Iso-C (Marczak et al., ICML 2025, "No Task Left Behind"): the task-arithmetic sum with an
isotropic spectrum.

Per matrix (2-D keys not excluded): S = Σₜ Δₜ = U diag(σ) Vᵀ with all r = min(m, n) triplets;
M = mean(σ) · U Vᵀ (every singular value replaced by the mean of all r). Other keys: the mean task
vector. W = W_pre + α·M, α tuned on validation by the authors (0.1 … 3.0), 1.0 by default here.
The triplets of S come the way the TSV route gets them (a float64 Gram and its eigenvectors), never
from an SVD of the m×n matrix; numerically zero ones (rank-deficient sums) are dropped as in TSV.
"""
from __future__ import annotations

from .base import Method, flat_spectrum, merged_outputs


class IsoC(Method):
    name = "iso-c"
    uses_rank_rule = False

    def rank(self, key, shape, num_tasks, options) -> int:
        return min(shape)  # every singular direction of the sum

    def merge_group(self, chunk, ctx):
        u, sigma, v = chunk.sum_factors(chunk.rank)
        return merged_outputs(chunk, ctx, u * flat_spectrum(sigma, chunk.rank).unsqueeze(1), v)
