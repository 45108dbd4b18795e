"""TSV-M (Gargiulo et al., CVPR 2025, Algorithm 1): each task's top-k singular triplets, the stacked
singular vectors orthogonalised (polar factors), the original spectrum kept."""
from __future__ import annotations

from .base import Method
from .stacks import orthogonal_merge


class TsvM(Method):
    """k = int(min(m, n) · rank_fraction) triplets per task (1/T by default); M = U⊥ Σ V⊥ᵀ."""

    name = "tsv-m"

    def merge_group(self, chunk, ctx):
        factors = chunk.task_factors(chunk.rank)
        return orthogonal_merge(chunk, ctx, factors.u, factors.sigma, factors.v)
