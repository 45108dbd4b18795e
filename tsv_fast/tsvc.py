"""TSV-C (paper Eqs. 5/8): keep each task's top-k factors, rebuild any task on demand."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checkpoint import as_checkpoint
from .merge import Options, Report, _device_of, _load_checked, backend_for, factor_chunks, make_plan


@dataclass
class CompressedTasks:
    """Per-task low-rank factors of every matrix plus the raw task vectors of the other keys.

    ``factors[key] = (U [T, m, k], σ [T, k], V [T, n, k])`` and ``others[key] = Δ [T, ...]``, stored in
    ``storage_dtype``; ``shapes``/``dtypes`` describe the original keys (in checkpoint order).
    """

    factors: dict[str, tuple[Tensor, Tensor, Tensor]]
    others: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    num_tasks: int
    metadata: dict[str, str] = field(default_factory=dict)

    def task_vector(self, task: int) -> dict[str, Tensor]:
        """Δ̂ᵢ: Uᵢ diag(σᵢ) Vᵢᵀ for matrices, the stored Δᵢ for the rest (keys in checkpoint order)."""
        if not -self.num_tasks <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for {self.num_tasks} compressed tasks")
        out = {}
        for key in self.shapes:
            if key in self.factors:
                u, s, v = (f[task].to(torch.promote_types(f.dtype, torch.float32)) for f in self.factors[key])
                out[key] = (u * s) @ v.mT
            elif key in self.others:
                out[key] = self.others[key][task]
            else:  # zero-rank or all-zero layer
                out[key] = torch.zeros(self.shapes[key])
        return out

    def reconstruct(self, task: int, pretrained: Mapping[str, Tensor] | object | None = None) -> dict[str, Tensor]:
        """Full weights of ``task``: W_pre + Δ̂ᵢ in the original dtypes (task vector if no pretrained)."""
        delta = self.task_vector(task)
        if pretrained is None:
            return {key: d.to(self.dtypes[key]) for key, d in delta.items()}
        pre = as_checkpoint(pretrained, "the pretrained checkpoint")
        out = {}
        for key, d in delta.items():
            base = pre.load(key)
            if not base.is_floating_point():
                out[key] = base.clone()
            else:
                work = torch.promote_types(torch.promote_types(base.dtype, d.dtype), torch.float32)
                out[key] = (base.to(work) + d.to(base.device, work)).to(self.dtypes[key])
        return out

    def storage(self) -> dict[str, int | float]:
        """Numbers stored versus the T dense task vectors (k(m + n + 1) instead of mn per matrix)."""
        stored = sum(u.numel() + s.numel() + v.numel() for u, s, v in self.factors.values())
        stored += sum(t.numel() for t in self.others.values())
        dense = self.num_tasks * sum(torch.Size(shape).numel() for shape in self.shapes.values())
        return {"stored_numbers": stored, "dense_numbers": dense, "ratio": stored / max(dense, 1)}


def compress(pretrained, finetuned: Sequence, *, rank_fraction: float | None = None,
             exclude: Sequence[str] = ("text_projection",), backend: str = "auto",
             device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.float32,
             min_rank: int = 0, rank_overrides: Mapping[str, float | int] | None = None,
             storage_dtype: torch.dtype = torch.float32, progress: bool = False,
             exact: bool = False) -> CompressedTasks:
    """TSV-C: each task's top-k singular triplets per matrix (k = int(min(m, n)/T) by default).

    ``pretrained=None`` takes ``finetuned`` as task vectors; ``exact=True`` takes the factors from
    full SVDs in ``compute_dtype`` (the authors' route) instead of the float64 Gram route. Example:
        >>> packed = compress(pretrained_sd, [ft_a, ft_b, ft_c])
        >>> weights_b = packed.reconstruct(1, pretrained_sd)
        >>> packed.storage()["ratio"]   # 1/T of the dense task vectors, roughly
    """
    options = Options(rank_fraction, rank_overrides, exclude, min_rank, compute_dtype, backend, device,
                      progress=progress, exact=exact)
    pre = as_checkpoint(pretrained, "the pretrained checkpoint") if pretrained is not None else None
    sources = [as_checkpoint(ft, f"fine-tuned checkpoint {i}") for i, ft in enumerate(finetuned)]
    plan = make_plan(pre, sources, options)
    device = _device_of(options, plan)
    backend_impl = backend_for(options, device)
    ref = plan.reference
    factors, others = {}, {}
    for key in plan.averaged:
        base = _load_checked(pre, key, device).to(compute_dtype) if pre is not None else 0
        if ref.dtype(key).is_floating_point:
            others[key] = torch.stack([_load_checked(c, key, device).to(compute_dtype) - base
                                       for c in sources]).to(storage_dtype).cpu()
    for chunk in factor_chunks(pre, sources, plan, options, backend_impl, Report()):
        for i, key in enumerate(chunk.keys):
            factors[key] = tuple(t[i].to(storage_dtype).cpu() for t in (chunk.u, chunk.sigma, chunk.v))
    return CompressedTasks(factors, others, {key: ref.shape(key) for key in ref.keys()},
                           {key: ref.dtype(key) for key in ref.keys()}, len(sources),
                           {"method": "tsv-c", "num_tasks": str(len(sources)),
                            "rank_fraction": str(rank_fraction or f"1/{len(sources)}")})
