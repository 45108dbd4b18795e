"""Singular Task Interference (paper Eq. 7), per layer and per block."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from .checkpoint import as_checkpoint
from .merge import Options, Report, _device_of, backend_for, factor_chunks, make_plan, stacks

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def interference(pretrained, finetuned: Sequence, *, rank_fraction: float | None = None,
                 exclude: Sequence[str] = ("text_projection",), orthogonalized: bool = False,
                 backend: str = "auto", device: torch.device | str | None = None,
                 min_rank: int = 0, rank_overrides: Mapping[str, float | int] | None = None,
                 progress: bool = False, exact: bool = False) -> dict[str, float]:
    """STI = ‖(UᵀU - I) Σ (VᵀV - I)‖₁ for every merged matrix key, from the Grams of its stacks.

    ``pretrained=None`` takes ``finetuned`` as task vectors. With ``orthogonalized=True`` the stacks
    are first replaced by their polar factors U⊥, V⊥ (the interference left after TSV-M; ≈ 0 unless a
    stack is rank-deficient). Layers with k = 0 or an all-zero task matrix are left out.
    ``exact=True`` takes the factors from float64 full SVDs (the authors' route).

    Example:
        >>> sti = interference(pretrained_sd, finetuned_sds)
        >>> per_block(sti)   # {'visual.transformer.resblocks.0': 12.3, ...}
    """
    options = Options(rank_fraction, rank_overrides, exclude, min_rank, torch.float64, backend, device,
                      progress=progress, exact=exact)
    pre = as_checkpoint(pretrained, "the pretrained checkpoint") if pretrained is not None else None
    sources = [as_checkpoint(ft, f"fine-tuned checkpoint {i}") for i, ft in enumerate(finetuned)]
    plan = make_plan(pre, sources, options)
    backend_impl = backend_for(options, _device_of(options, plan))
    result: dict[str, float] = {}
    for chunk in factor_chunks(pre, sources, plan, options, backend_impl, Report()):
        u, sigma, v = stacks(chunk)
        if orthogonalized:
            u, v = backend_impl.orthogonalize(u)[0], backend_impl.orthogonalize(v)[0]
        gram_u, gram_v = backend_impl.stack_gram(u), backend_impl.stack_gram(v)
        for key, value in zip(chunk.keys, backend_impl.sti(gram_u, sigma, gram_v).tolist()):
            result[key] = value
    order = {key: i for i, key in enumerate(plan.reference.keys())}
    return dict(sorted(result.items(), key=lambda item: order[item[0]]))


def per_block(per_layer: Mapping[str, float]) -> dict[str, float]:
    """Sum per-layer STI over transformer blocks: the key prefix up to its first ``.<number>``."""
    blocks: dict[str, float] = {}
    for key, value in per_layer.items():
        match = _BLOCK.match(key)
        name = match.group(1) if match else key.rsplit(".", 1)[0]
        blocks[name] = blocks.get(name, 0.0) + value
    return blocks
