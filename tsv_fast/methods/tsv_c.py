"""TSV-C (paper Eqs. 5/8): keep each task's top-k factors of every matrix, rebuild any task on demand.

The method writes factors, not weights: per matrix (U [T, m, k], σ [T, k], V [T, n, k]) in the
storage dtype, per other floating key the T raw task vectors; ``CompressedSink`` gathers them into a
``io.tsvc.CompressedTasks`` (save it with ``io.tsvc.save_compressed``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..io.checkpoint import Checkpoint, Sink
from ..io.tsvc import CompressedTasks
from ..options import parse_dtype
from .base import Method


@dataclass
class TsvC(Method):
    storage_dtype: torch.dtype = torch.float32

    name = "tsv-c"
    writes = "factors"

    def __post_init__(self) -> None:
        self.storage_dtype = parse_dtype(self.storage_dtype, floating=True)

    def merge_group(self, chunk, ctx):
        factors = chunk.task_factors(chunk.rank)
        width = max(factors.widths)
        out = []
        for i, key in enumerate(chunk.keys):
            per_task = [factors.task(t) for t in range(ctx.num_tasks)]
            # tasks with fewer triplets (LoRA rank < k) are padded with zero columns, σ = 0
            u, s, v = (torch.stack([_pad(p[j][i], width) for p in per_task]).to(self.storage_dtype).cpu()
                       for j in range(3))
            out.append((key, (u, s, v), None))
        return out

    def elementwise(self, key, base, deltas, ctx):
        if not base.is_floating_point():
            return None
        return torch.stack(list(deltas)).to(self.storage_dtype).cpu()

    def unchanged(self, key, base, ctx):
        return None  # stored as "zero": the base is the task's weight there

    def metadata(self) -> dict[str, str]:
        return {"storage_dtype": str(self.storage_dtype).removeprefix("torch.")}


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - x.shape[-1]
    return x if missing == 0 else torch.nn.functional.pad(x, (0, missing))


class CompressedSink(Sink):
    """Gathers TSV-C outputs into a CompressedTasks (keys in the layout's order)."""

    def __init__(self, layout: Checkpoint, num_tasks: int):
        self.layout, self.num_tasks = layout, num_tasks
        self.factors, self.others = {}, {}

    def write(self, key, value) -> None:
        (self.factors if isinstance(value, tuple) else self.others)[key] = value

    def close(self, metadata) -> CompressedTasks:
        keys = self.layout.keys()
        return CompressedTasks(self.factors, self.others, {key: tuple(self.layout.shape(key)) for key in keys},
                               {key: self.layout.dtype(key) for key in keys}, self.num_tasks, dict(metadata))
