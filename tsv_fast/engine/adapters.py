"""LoRA adapters as a task source: every method runs on T adapters of one base without densifying.

A task's factors come from its low-rank pieces (``io.peft.LoraFactor.svd``: QR of each side and an
r×r SVD, O((m + n) r²)), so a task keeps min(k, r) triplets and the stacks are Σₜ rₜ columns wide;
the orthogonalisation and reconstruction are the dense route's, so the result equals the method on
the dense task vectors. Weights an adapter saves whole (``modules_to_save``, biases) are task vectors
full − base, factored by the backend. Keys no adapter touches pass through from the base.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..io.checkpoint import Checkpoint
from ..io.peft import LoraAdapter
from ..reference import ZERO_RTOL
from .sources import F64, Chunk, Factors, TaskSource, load_checked


class AdapterTasks(TaskSource):
    def __init__(self, base: Checkpoint, adapters: Sequence[LoraAdapter]):
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
                want = self.base.shape(key)
                got = task.factors[key].shape() if key in task.factors else tuple(task.full[key].shape)
                if tuple(got) != tuple(want):
                    raise ValueError(f"{task.name}: key {key!r} has shape {tuple(got)} but {self.base.name} "
                                     f"has {tuple(want)}")

    def touched(self, key: str) -> bool:
        return any(key in task.factors or key in task.full for task in self.adapters)

    def base_tensor(self, key: str, device: torch.device) -> Tensor:
        return load_checked(self.base, key, device)

    def deltas(self, key: str, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
        weight = load_checked(self.base, key, device)
        for task in self.adapters:
            if key in task.factors:
                yield task.factors[key].dense(dtype).to(device)
            elif key in task.full:
                yield task.full[key].to(device, dtype) - weight.to(dtype)
            else:
                yield torch.zeros(weight.shape, dtype=dtype, device=device)

    def chunks(self, groups, backend, options, device) -> Iterator[tuple[Chunk, list[str]]]:
        for group in groups:
            for key in group.keys:  # one matrix per chunk: the factor work is O((m + n) r²) anyway
                base = load_checked(self.base, key, device)
                if all(self._is_zero(task, key, base) for task in self.adapters):
                    yield AdapterChunk(self, [], group, None, backend, device), [key]
                else:
                    yield AdapterChunk(self, [key], group, base, backend, device), []

    @staticmethod
    def _is_zero(task: LoraAdapter, key: str, base: Tensor) -> bool:
        if key in task.factors:
            return task.factors[key].is_zero()
        if key in task.full:
            return torch.equal(task.full[key].to(base.device, base.dtype), base)
        return True


class AdapterChunk(Chunk):
    def __init__(self, source: AdapterTasks, keys: list[str], group, base: Tensor | None, backend,
                 device: torch.device):
        self.source, self.keys, self.backend, self.device = source, keys, backend, device
        self.shape, self.rank, self.out_dtype = group.shape, group.rank, group.out_dtype
        self.base = None if base is None else base.unsqueeze(0)

    def task_factors(self, k: int, project_out: Tensor | None = None) -> Factors:
        key, (m, n) = self.keys[0], self.shape
        project = None if project_out is None else project_out[0]
        parts = []
        for task in self.source.adapters:
            if key in task.factors:
                parts.append(task.factors[key].svd(k, self.device, project))
            elif key in task.full:  # a dense replacement: the dense route for this one task
                delta = task.full[key].to(self.device, F64) - self.base[0].to(F64)
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
