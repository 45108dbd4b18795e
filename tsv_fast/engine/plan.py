"""The plan of a run: which keys a method factors (in groups of same-shape matrices), which it
combines elementwise, and which pass through unchanged."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import Options, is_merged_as_matrix


@dataclass(frozen=True)
class Group:
    """Same-shape matrices with the same rank and dtype: processed together, chunk by chunk."""

    shape: tuple[int, ...]
    rank: int                 # the method's rank for these matrices (per-task k for TSV)
    out_dtype: torch.dtype    # output dtype: options.out_dtype, else the reference checkpoint's
    keys: tuple[str, ...]


@dataclass
class Plan:
    num_tasks: int
    groups: list[Group]
    elementwise: list[str]   # non-matrix and excluded keys (and every key for elementwise methods)
    unchanged: list[str]     # non-floating keys and keys that no task changes
    zero_rank: list[str]     # matrices whose rank is 0 (min(m, n) < T for TSV): no matrix update

    @property
    def matrices(self) -> int:
        return sum(len(group.keys) for group in self.groups)


def make_plan(source, method, options: Options, low_rank: bool = False) -> Plan:
    """Sort the keys of ``source`` (checked consistent beforehand) for ``method``; ``low_rank``: the
    run hands the sink factored updates, so a method may factor keys it would otherwise combine
    elementwise (Task Arithmetic)."""
    reference = source.reference
    groups: dict[tuple, list[str]] = {}
    elementwise, unchanged, zero_rank = [], [], []
    for key in reference.keys():
        shape, dtype = tuple(reference.shape(key)), reference.dtype(key)
        if not dtype.is_floating_point or not source.touched(key):
            unchanged.append(key)
        elif not method.factors(low_rank) or not is_merged_as_matrix(key, shape, options.exclude):
            elementwise.append(key)
        else:
            rank = method.rank(key, shape, source.num_tasks, options)
            if rank == 0:
                zero_rank.append(key)
            else:
                groups.setdefault((shape, rank, options.out_dtype or dtype), []).append(key)
    return Plan(source.num_tasks, [Group(shape, rank, dtype, tuple(keys)) for (shape, rank, dtype), keys in groups.items()],
                elementwise, unchanged, zero_rank)
