"""Synthetic task matrices and checkpoints with a prescribed spectrum and shared subspaces.

Used by the tests (exact spectra), the demo and the benchmarks (real layer shapes). Fine-tuning
deltas of real models have fast-decaying spectra and tasks that share part of their subspace; both
are parameters here, so every spectrum class of DESIGN.md §5 can be generated.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .io.checkpoint import Checkpoint

SPECTRA = ("decay", "fast_decay", "clustered", "flat")


def spectrum(rank: int, kind: str = "decay", *, cluster_at: int | None = None,
             dtype: torch.dtype = torch.float64) -> Tensor:
    """Singular values σ₁ ≥ … ≥ σ_rank > 0 (σ₁ = 1).

    decay: σⱼ = 0.97^j (gentle, like fine-tuned ViTs); fast_decay: σⱼ = 0.8^j floored at 1e-4;
    clustered: a decaying spectrum whose values around index ``cluster_at`` (the cut k) are equal to
    within 1e-3; flat: all ones.
    """
    j = torch.arange(rank, dtype=dtype)
    if kind == "decay":
        return 0.97 ** j
    if kind == "fast_decay":
        return (0.8 ** j).clamp_min(1e-4)
    if kind == "flat":
        return torch.ones(rank, dtype=dtype)
    if kind == "clustered":
        values = 0.97 ** j
        at = rank // 2 if cluster_at is None else cluster_at
        lo, hi = max(at - 2, 0), min(at + 2, rank)
        values[lo:hi] = values[at if at < rank else rank - 1] * (1 + 1e-3 * torch.arange(hi - lo, 0, -1, dtype=dtype))
        return values.sort(descending=True).values
    raise ValueError(f"unknown spectrum {kind!r}; choose one of {SPECTRA}")


def _orthonormal(rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).to(dtype)


def task_matrices(shape: tuple[int, int], num_tasks: int, *, rank: int | None = None, shared: float = 0.0,
                  kind: str = "decay", scale: float = 1.0, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """T task matrices [T, m, n], Δᵢ = Uᵢ diag(σ) Vᵢᵀ with exactly orthonormal Uᵢ, Vᵢ.

    ``shared`` ∈ [0, 1) sets how much of their subspaces the tasks share: Uᵢ spans
    orth(√shared·A + √(1 - shared)·Bᵢ) with A common to all tasks. ``rank`` defaults to min(m, n).
    """
    m, n = shape
    rank = min(m, n) if rank is None else rank
    generator = torch.Generator().manual_seed(seed)
    sigma = scale * spectrum(rank, kind, cluster_at=min(m, n) // num_tasks)
    common_u = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    common_v = torch.randn(n, rank, generator=generator, dtype=torch.float64)
    out = torch.empty(num_tasks, m, n, dtype=torch.float64)
    a, b = math.sqrt(shared), math.sqrt(1.0 - shared)
    for i in range(num_tasks):
        u = torch.linalg.qr(a * common_u + b * torch.randn(m, rank, generator=generator, dtype=torch.float64))[0]
        v = torch.linalg.qr(a * common_v + b * torch.randn(n, rank, generator=generator, dtype=torch.float64))[0]
        out[i] = (u * sigma) @ v.mT
    return out.to(dtype)


# ------------------------------------------------------------------------------------------------
# Real layer layouts (key -> shape), open_clip visual encoders and a LLaMA-7B decoder layer
# ------------------------------------------------------------------------------------------------
def _vit_layout(width: int, layers: int, patch: int, grid: int, out_dim: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (grid * grid + 1, width),
        "visual.proj": (width, out_dim),
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,),
        })
    shapes.update({"visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,)})
    return shapes


def _llama_layer(width: int = 4096, hidden: int = 11008, index: int = 0) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{index}."
    return {p + "input_layernorm.weight": (width,),
            **{p + f"self_attn.{name}_proj.weight": (width, width) for name in "qkvo"},
            p + "post_attention_layernorm.weight": (width,),
            p + "mlp.gate_proj.weight": (hidden, width), p + "mlp.up_proj.weight": (hidden, width),
            p + "mlp.down_proj.weight": (width, hidden)}


def _llama(layers: int = 32, width: int = 4096, hidden: int = 11008, vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """LLaMA-7B (Hugging Face names): embeddings, ``layers`` decoder layers, final norm, LM head."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, width)}
    for i in range(layers):
        shapes.update(_llama_layer(width, hidden, i))
    shapes.update({"model.norm.weight": (width,), "lm_head.weight": (vocab, width)})
    return shapes


LAYOUTS = {
    "vit-b-32": lambda: _vit_layout(768, 12, 32, 7, 512),
    "vit-b-16": lambda: _vit_layout(768, 12, 16, 14, 512),
    "vit-l-14": lambda: _vit_layout(1024, 24, 14, 16, 768),
    "llama-7b-layer": _llama_layer,
    "llama-7b": _llama,   # shapes only: too large to generate, for plan estimates (LayoutCheckpoint)
    "tiny-vit": lambda: _vit_layout(64, 2, 4, 4, 32),
}


def layout(name: str) -> dict[str, tuple[int, ...]]:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]()


class LayoutCheckpoint(Checkpoint):
    """The keys, shapes and dtype of a layout without any data: enough to plan a run and estimate its
    cost (engine.partition), e.g. for LLaMA-7B, whose tensors are never made here."""

    def __init__(self, name: str, dtype: torch.dtype = torch.float32):
        self.name, self.shapes, self._dtype = name, layout(name), dtype

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype

    def load(self, key: str) -> Tensor:
        raise NotImplementedError(f"{self.name} is a layout without data")


def checkpoint(name: str, task: int | None = None, *, seed: int = 0, shared: float = 0.3, delta_scale: float = 1e-2,
               delta_rank: int | None = 64, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Tensor]]:
    """One checkpoint of layout ``name``, key by key: the pretrained one (``task=None``) or fine-tune
    ``task``. Every key has its own random streams (seeded by seed, key and role), so one checkpoint
    is made without the others and with one key in memory: exactly the tensors of ``checkpoints``.

    Matrix deltas are Gaussian factors of rank ``delta_rank`` (None: full) with geometrically decaying
    weights and a ``shared`` fraction of a subspace common to all tasks; other deltas are small
    Gaussian noise.
    """
    a, b = math.sqrt(shared), math.sqrt(1.0 - shared)
    for key, shape in layout(name).items():
        base = torch.randn(shape, generator=_stream(seed, key, "base")) * 0.02
        if task is None:
            yield key, base.to(dtype)
            continue
        own = _stream(seed, key, f"task {task}")
        if len(shape) == 2:
            m, n = shape
            r = min(m, n) if delta_rank is None else min(delta_rank, m, n)
            weights = (0.95 ** torch.arange(r)) * (delta_scale / math.sqrt(r))
            common = _stream(seed, key, "common")
            common_l, common_r = torch.randn(m, r, generator=common), torch.randn(r, n, generator=common)
            left = a * common_l + b * torch.randn(m, r, generator=own)
            right = b * torch.randn(r, n, generator=own) + a * common_r
            yield key, (base + (left * weights) @ right).to(dtype)
        else:
            yield key, (base + delta_scale * torch.randn(shape, generator=own)).to(dtype)


def checkpoints(name: str, num_tasks: int, **options) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """A pretrained state dict and T fine-tunes of layout ``name`` (``checkpoint`` for each, in memory;
    the options are ``checkpoint``'s), cheap enough for real shapes."""
    return dict(checkpoint(name, None, **options)), [dict(checkpoint(name, t, **options)) for t in range(num_tasks)]


def _stream(seed: int, key: str, role: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{key}/{role}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
