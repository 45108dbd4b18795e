"""Singular Task Interference (paper Eq. 7), per layer and per block.

STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁ (entrywise L1) of each matrix's stacked top-k singular vectors,
computed from the stack Grams. With ``orthogonalized`` the stacks are first replaced by their polar
factors U⊥, V⊥ (the interference left after TSV-M; ≈ 0 unless a stack is rank-deficient).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .base import Method

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


@dataclass
class Sti(Method):
    orthogonalized: bool = False

    name = "sti"
    writes = "scores"

    def __post_init__(self) -> None:
        if not isinstance(self.orthogonalized, bool):
            raise TypeError(f"orthogonalized must be True or False, got {self.orthogonalized!r}")

    def merge_group(self, chunk, ctx):
        backend = ctx.backend
        factors = chunk.task_factors(chunk.rank)
        u, v = factors.u, factors.v
        if self.orthogonalized:
            u, v = backend.orthogonalize(u)[0], backend.orthogonalize(v)[0]
        values = backend.sti(backend.stack_gram(u), factors.sigma, backend.stack_gram(v)).tolist()
        return [(key, value, None) for key, value in zip(chunk.keys, values)]

    def elementwise(self, key, base, deltas, ctx):
        return None  # STI is defined for factored matrices only

    def unchanged(self, key, base, ctx):
        return None


def per_block(per_layer: Mapping[str, float]) -> dict[str, float]:
    """Sum per-layer STI over transformer blocks: the key prefix up to its first ``.<number>``."""
    blocks: dict[str, float] = {}
    for key, value in per_layer.items():
        match = _BLOCK.match(key)
        name = match.group(1) if match else key.rsplit(".", 1)[0]
        blocks[name] = blocks.get(name, 0.0) + value
    return blocks
