"""Factored tasks as a source: every method runs on T LoRA adapters (or TSV-C library tasks) of one
base without densifying.

A task's factors come from its low-rank pieces (``io.peft.lowrank_svd``: QR of each side and a small
SVD, O((m + n) r²)), so a task keeps min(k, r) triplets and the stacks are Σₜ rₜ columns wide; the
orthogonalisation and reconstruction are the dense route's, so the result equals the method on the
dense task vectors. The sum of the tasks, where a method needs it (Iso-C, Iso-CTS, Task Arithmetic
with factored outputs), is factored the same way from the concatenated pieces. Weights a task stores
whole (``modules_to_save``, biases, a library's averaged keys) are dense task vectors, factored by
the backend. Keys no task touches pass through from the base.

A task answers ``name``, ``keys()``, ``shape(key)``, ``factor(key)`` (an ``io.peft.LoraFactor`` or
None) and ``delta(key, base, dtype)`` (a dense task vector or None): ``io.peft.LoraAdapter`` and
``io.tsvc.LibraryTask`` do.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..io.checkpoint import Checkpoint
from ..io.peft import lowrank_svd
from ..reference import ZERO_RTOL
from .sources import F64, Chunk, Factors, TaskSource, load_checked


class AdapterTasks(TaskSource):
    factored = True

    def __init__(self, base: Checkpoint, adapters: Sequence):
        if not adapters:
            raise ValueError("need at least one LoRA adapter")
        self.base, self.adapters = base, list(adapters)
        self.reference, self.has_base, self.num_tasks = base, True, len(self.adapters)

    def check(self, options=None) -> None:
        names = set(self.base.keys())
        for task in self.adapters:
            for key in sorted(task.keys()):
                if key not in names:
                    close = [n for n in names if n.endswith(key.split(".", 1)[-1])][:3]
                    raise ValueError(f"{task.name}: adapts {key!r}, which {self.base.name} does not have"
                                     + (f" (similar base keys: {close})" if close else "")
                                     + "; is the adapter for another model?")
                want, got = self.base.shape(key), task.shape(key)
                if tuple(got) != tuple(want):
                    raise ValueError(f"{task.name}: key {key!r} has shape {tuple(got)} but {self.base.name} "
                                     f"has {tuple(want)}")

    def touched(self, key: str) -> bool:
        return any(key in task.keys() for task in self.adapters)

    def base_tensor(self, key: str, device: torch.device) -> Tensor:
        return load_checked(self.base, key, device)

    def deltas(self, key: str, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
        weight = load_checked(self.base, key, device)
        for task in self.adapters:
            factor = task.factor(key)
            if factor is not None:
                yield factor.dense(dtype).to(device)
                continue
            delta = task.delta(key, weight, dtype)
            yield torch.zeros(weight.shape, dtype=dtype, device=device) if delta is None else delta.to(device, dtype)

    def chunks(self, groups, backend, options, device) -> Iterator[tuple[Chunk, list[str]]]:
        for group in groups:
            for key in group.keys:  # one matrix per chunk: the factor work is O((m + n) r²) anyway
                base = load_checked(self.base, key, device)
                if all(self._is_zero(task, key, base) for task in self.adapters):
                    yield AdapterChunk(self, [], group, None, backend, device), [key]
                else:
                    yield AdapterChunk(self, [key], group, base, backend, device), []

    @staticmethod
    def _is_zero(task, key: str, base: Tensor) -> bool:
        factor = task.factor(key)
        if factor is not None:
            return factor.is_zero()
        delta = task.delta(key, base, base.dtype)
        return delta is None or not bool(delta.any())


class AdapterChunk(Chunk):
    def __init__(self, source: AdapterTasks, keys: list[str], group, base: Tensor | None, backend,
                 device: torch.device):
        self.source, self.keys, self.backend, self.device = source, keys, backend, device
        self.shape, self.rank, self.out_dtype = group.shape, group.rank, group.out_dtype
        self.base = None if base is None else base.unsqueeze(0)

    @property
    def factored_only(self) -> bool:
        key = self.keys[0]
        return all(key not in task.keys() or task.factor(key) is not None for task in self.source.adapters)

    def task_factors(self, k: int, project_out: Tensor | None = None) -> Factors:
        key, (m, n) = self.keys[0], self.shape
        project = None if project_out is None else project_out[0]
        parts = []
        for task in self.source.adapters:
            factor = task.factor(key)
            delta = None if factor is not None else task.delta(key, self.base[0], F64)
            if factor is not None:
                parts.append(factor.svd(k, self.device, project))
            elif delta is not None:  # a weight stored whole: the dense route for this one task
                delta = delta.to(self.device)
                floor = ZERO_RTOL * torch.linalg.matrix_norm(delta)
                if project is not None:
                    delta = delta - project @ (project.mT @ delta)
                u, s, v = (t[0, 0] for t in self.backend.task_factors(delta[None, None], None, k))
                keep = s > (floor if project is not None else 0)
                parts.append((u[:, keep], s[keep], v[:, keep]))
            else:
                parts.append((torch.zeros(m, 0, dtype=F64, device=self.device), torch.zeros(0, dtype=F64, device=self.device),
                              torch.zeros(n, 0, dtype=F64, device=self.device)))
        return Factors(torch.cat([p[0] for p in parts], dim=1)[None], torch.cat([p[1] for p in parts])[None],
                       torch.cat([p[2] for p in parts], dim=1)[None], tuple(p[1].numel() for p in parts))

    def task_sum(self) -> Tensor:
        total = torch.zeros(self.shape, dtype=F64, device=self.device)
        for delta in self.source.deltas(self.keys[0], F64, self.device):
            total += delta
        return total[None]

    def sum_factors(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Σₜ Δₜ = [L₁ … L_T] [R₁ … R_T]ᵀ: its top-k triplets from the concatenated pieces."""
        if not self.factored_only:
            return super().sum_factors(k)
        sides = [factor.sides(self.device) for task in self.source.adapters
                 if (factor := task.factor(self.keys[0])) is not None]
        u, sigma, v = lowrank_svd(torch.cat([s[0] for s in sides], dim=1), torch.cat([s[1] for s in sides], dim=1), k)
        return u[None], sigma[None], v[None]
