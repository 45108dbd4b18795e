"""What a run learned: per-layer rank, conditioning of the stacks and STI, and the key lists."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from ..reference import GRAM_RTOL


@dataclass
class LayerReport:
    """One matrix: its rank per task, κ and numerical rank of its stacks, its STI."""

    key: str
    shape: tuple[int, ...]
    k: int
    kappa_u: float = math.nan
    kappa_v: float = math.nan
    rank_u: int = 0
    rank_v: int = 0
    sti: float = math.nan


@dataclass
class Report:
    backend: str = ""
    method: str = ""
    num_tasks: int = 0
    seconds: float = 0.0
    layers: dict[str, LayerReport] = field(default_factory=dict)
    averaged: list[str] = field(default_factory=list)   # combined elementwise (non-matrix or excluded keys)
    zero_rank: list[str] = field(default_factory=list)  # k = 0: no matrix update
    zero_delta: list[str] = field(default_factory=list)  # every task vector is zero: no factor work
    ranks: list[dict] = field(default_factory=list)  # a distributed run: per rank keys, seconds, peak memory


def kappa_and_rank(evals: Tensor) -> tuple[list[float], list[int]]:
    """κ(X) = sqrt(λ_max / λ_min) of its Gram over the numerical range, and that range's size.

    evals: [L, K] eigenvalues of the stack Grams, ascending.
    """
    floor = GRAM_RTOL * evals.shape[-1] * evals[..., -1:].clamp_min(0)
    kept = evals > floor
    smallest = evals.where(kept, math.inf).amin(dim=-1)
    kappa = (evals[..., -1] / smallest).sqrt()
    return kappa.tolist(), kept.sum(dim=-1).tolist()
