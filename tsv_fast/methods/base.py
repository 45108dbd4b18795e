"""The interface every method implements, and the defaults of the methods that write weights.

A method says
* which matrices it factors and at what rank (``rank``; 0: the matrix gets no update),
* what it makes of one chunk of same-shape matrices (``merge_group``), pulling from the chunk what it
  needs: each task's top-k factors (``chunk.task_factors(k)``, optionally of the residual outside a
  subspace) and/or the sum of the task vectors (``chunk.task_sum()``),
* what it makes of a key combined elementwise (``elementwise``) and of a key no task changes
  (``unchanged``), and what its outputs are (``writes``: "weights", "factors" or "scores").
The engine (tsv_fast.engine) streams the chunks within the memory budget; the backend does the
linear algebra. A new method is one module here, its float64 twin in ``reference``, its tests and a
line in ``methods.REGISTRY``.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..io.checkpoint import LowRank
from ..options import Options

Output = tuple[str, object, object]  # (key, value for the sink, LayerReport or None)


class Method:
    name: ClassVar[str] = ""
    writes: ClassVar[str] = "weights"
    factored: ClassVar[bool] = True          # False: every floating key is combined elementwise
    uses_rank_rule: ClassVar[bool] = True    # reads rank_fraction / rank_overrides / min_rank

    def rank(self, key: str, shape: Sequence[int], num_tasks: int, options: Options) -> int:
        """The rank of this matrix for the method (0: no matrix update)."""
        return options.rank(key, shape, num_tasks)

    def factors(self, low_rank: bool) -> bool:
        """Whether matrices go through ``merge_group`` (else ``elementwise``); ``low_rank``: the run
        hands the sink factored updates."""
        return self.factored

    def merge_group(self, chunk, ctx) -> Iterable[Output]:
        raise NotImplementedError

    def elementwise(self, key: str, base: Tensor, deltas: Iterator[Tensor], ctx) -> object | None:
        """Non-matrix keys of a weights method: base + α · mean of the task vectors."""
        if not base.is_floating_point():
            return base.clone()
        total = running_sum(deltas)
        return (base.to(total.dtype) + (ctx.options.alpha / ctx.num_tasks) * total).to(ctx.out_dtype(base.dtype))

    def unchanged(self, key: str, base: Tensor, ctx) -> object | None:
        """Keys no task changes (or with k = 0): the base weight (zeros for task-vector inputs)."""
        return base.clone()

    def check_options(self, options: Options) -> None:
        """Refuse options this method would silently ignore."""
        if not self.uses_rank_rule:
            used = [name for name, default in (("rank_fraction", None), ("rank_overrides", None), ("min_rank", 0))
                    if getattr(options, name) != default]
            if used:
                raise ValueError(f"method {self.name!r} does not use a per-task rank rule; remove {', '.join(used)}")

    def metadata(self) -> dict[str, str]:
        return {}


def merged_outputs(chunk, ctx, a: Tensor, b: Tensor, layers: Sequence | None = None) -> list[Output]:
    """The outputs of a weights method whose update is α·A Bᵀ (A [L, m, K], B [L, n, K], float64):
    ``LowRank`` updates where the run asks for them and the chunk's tasks are all factored, else the
    merged weights base + α·A Bᵀ (the reconstruction GEMM in the compute dtype)."""
    layers = layers or [None] * len(chunk.keys)
    if ctx.low_rank and chunk.factored_only:
        return [(key, LowRank(ctx.options.alpha * a[i], b[i]), layers[i]) for i, key in enumerate(chunk.keys)]
    if a.shape[-1] == 0:  # no task changes these layers (e.g. adapters whose updates cancel)
        return [(key, chunk.base[i].clone(), layers[i]) for i, key in enumerate(chunk.keys)]
    cd = ctx.compute_dtype
    merged = ctx.backend.reconstruct(chunk.base, a.to(cd), b.to(cd), ctx.options.alpha, chunk.out_dtype)
    return [(key, merged[i], layers[i]) for i, key in enumerate(chunk.keys)]


def running_sum(deltas: Iterator[Tensor]) -> Tensor:
    """Σ of the task vectors, one in memory at a time."""
    total = None
    for delta in deltas:
        total = delta.clone() if total is None else total.add_(delta)
    return total


def flat_spectrum(sigma: Tensor, width: int) -> Tensor:
    """Iso's isotropic spectrum: every kept triplet gets the mean of all ``width`` singular values
    (numerically zero ones count as zeros in the mean and stay zero). sigma: [L, K] -> [L, K]."""
    mean = sigma.sum(dim=-1, keepdim=True) / width
    return torch.where(sigma > 0, mean, torch.zeros((), dtype=sigma.dtype, device=sigma.device))
