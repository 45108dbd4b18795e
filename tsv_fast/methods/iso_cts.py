"""Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind"): a common subspace from the task sum
plus task-specific directions, orthogonalised as in TSV-M, with an isotropic spectrum.

Per matrix (r = min(m, n), T tasks, fraction f = ``common_space_fraction``, 0.8 by default):
* sizes (the authors' rule, ``reference.iso_cts_split``): k = r − round((r − int(f·r)) / T)·T common
  directions, s = (r − k) / T per task;
* the top-k triplets (U_c, σ_c, V_c) of S = Σₜ Δₜ;
* per task the top-s triplets of its left residual Δₜ − U_c U_cᵀ Δₜ;
* the r stacked columns [U₁ … U_T, U_c] and [V₁ … V_T, V_c] orthogonalised (polar factors), every
  stacked singular value replaced by their mean: M = mean(σ) · U⊥ V⊥ᵀ.
Other keys: the mean task vector; W = W_pre + α·M.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import iso_cts_split
from .base import Method, flat_spectrum
from .stacks import orthogonal_merge


@dataclass
class IsoCTS(Method):
    common_space_fraction: float = 0.8

    name = "iso-cts"
    uses_rank_rule = False

    def __post_init__(self) -> None:
        fraction = self.common_space_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"common_space_fraction must be a number in [0, 1], got {fraction!r}")
        self.common_space_fraction = float(fraction)

    def rank(self, key, shape, num_tasks, options) -> int:
        return min(shape)  # the stacks are r columns wide

    def merge_group(self, chunk, ctx):
        common, per_task = iso_cts_split(chunk.rank, ctx.num_tasks, self.common_space_fraction)
        parts = []
        u_c = None
        if common:
            u_c, sigma_c, v_c = chunk.sum_factors(common)
        if per_task:
            specific = chunk.task_factors(per_task, project_out=u_c)
            parts.append((specific.u, specific.sigma, specific.v))
        if common:
            parts.append((u_c, sigma_c, v_c))
        u, sigma, v = (torch.cat(p, dim=-1) for p in zip(*parts))
        return orthogonal_merge(chunk, ctx, u, sigma, v, spectrum=flat_spectrum(sigma, chunk.rank))

    def metadata(self) -> dict[str, str]:
        return {"common_space_fraction": str(self.common_space_fraction)}
