"""Singular Task Interference, fused: STI = Σ_ab |((G_U - I) diag(σ) (G_V - I))_ab| per layer.

Math (Eq. 7 of arXiv 2412.00081): G_U = UᵀU, G_V = VᵀV are the [K, K] Grams of the concatenated
stacks, σ [K] the concatenated singular values. Each program computes one [B, B] tile of the
product P = (G_U - I) diag(σ) (G_V - I) in registers (the identity subtracted and σ applied on the
fly, as the tiles are loaded), reduces |P| over the tile to one partial sum and writes it; the
partials of a layer are summed in a fixed order afterwards (deterministic, unlike atomics). P is
never written to memory.

Precision: float64 Grams (the engine's) accumulate in float64; float32 Grams in IEEE fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_no_overlap, generation, pipeline_stages, resolve_precision


@triton.jit
def _sti_kernel(gu_ptr, s_ptr, gv_ptr, part_ptr, size,
                su_l, su_r, su_c, ss_l, ss_k, sv_l, sv_r, sv_c, sp_l,
                ACC_FP64: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[l, tile] = Σ_{tile} |Σ_c (G_U - I)[a, c] σ[c] (G_V - I)[c, b]|.

    Grid: (cdiv(K, BLOCK)², L).
    """
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    tiles = tl.cdiv(size, BLOCK)
    pid_a = pid // tiles
    pid_b = pid % tiles
    gu_ptr += layer * su_l
    gv_ptr += layer * sv_l
    s_ptr += layer * ss_l

    offs_a = pid_a * BLOCK + tl.arange(0, BLOCK)
    offs_b = pid_b * BLOCK + tl.arange(0, BLOCK)
    offs_c = tl.arange(0, BLOCK_C)
    mask_a = offs_a < size
    mask_b = offs_b < size
    if ACC_FP64:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for c0 in range(0, size, BLOCK_C):
        c = c0 + offs_c
        mask_c = c < size
        m_u = mask_a[:, None] & mask_c[None, :]
        m_v = mask_c[:, None] & mask_b[None, :]
        gu = tl.load(gu_ptr + offs_a[:, None].to(tl.int64) * su_r + c[None, :] * su_c, mask=m_u, other=0.0)
        gv = tl.load(gv_ptr + c[:, None].to(tl.int64) * sv_r + offs_b[None, :] * sv_c, mask=m_v, other=0.0)
        s = tl.load(s_ptr + c * ss_k, mask=mask_c, other=0.0)
        if ACC_FP64:
            gu, gv, s = gu.to(tl.float64), gv.to(tl.float64), s.to(tl.float64)
        else:
            gu, gv, s = gu.to(tl.float32), gv.to(tl.float32), s.to(tl.float32)
        # Identity only inside the matrix: a masked-out diagonal element must stay 0.
        gu = tl.where(m_u & (offs_a[:, None] == c[None, :]), gu - 1.0, gu)
        gv = tl.where(m_v & (c[:, None] == offs_b[None, :]), gv - 1.0, gv)
        if ACC_FP64:
            acc = tl.dot(gu * s[None, :], gv, acc, out_dtype=tl.float64)
        else:
            acc = tl.dot(gu * s[None, :], gv, acc, input_precision="ieee")
    partial = tl.sum(tl.sum(tl.abs(acc), axis=1), axis=0)
    tl.store(part_ptr + layer * sp_l + pid, partial)


def _sti_config(gen: int, size: int, precision: str) -> triton.Config:
    """One config chosen from the shape, not autotuned: the partials buffer is laid out by tile,
    so every run must use the tile size the host sized it for (autotuning would leave stale slots).
    """
    if gen == 0:  # interpreter: large enough to keep the program count small
        return triton.Config({"BLOCK": 32, "BLOCK_C": 32}, num_warps=4, num_stages=1)
    stages = pipeline_stages(gen)
    if size <= 512:
        # Small stacks (ViT-B/32 attention, K = T·k <= 512): 32-wide tiles keep the SMs busy.
        return triton.Config({"BLOCK": 32, "BLOCK_C": 32}, num_warps=4, num_stages=stages)
    if precision == "fp64":
        # fp64 tiles double register use: 64-wide is the largest that keeps full occupancy.
        return triton.Config({"BLOCK": 64, "BLOCK_C": 16}, num_warps=4, num_stages=stages)
    # Large fp32 stacks: 64-wide tiles with a deeper K step halve the re-reads of G_U and G_V.
    return triton.Config({"BLOCK": 64, "BLOCK_C": 32}, num_warps=4, num_stages=stages)


def sti(gram_u: torch.Tensor, sigma: torch.Tensor, gram_v: torch.Tensor, *,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """Singular Task Interference per layer, the product never stored.

    Args:
        gram_u, gram_v: [L, K, K] or [K, K] (any strides), float64 (engine) or float32.
        sigma: [L, K] or [K].
        out: optional preallocated [L] (or []) output in gram_u's dtype.

    Returns:
        [L] (or a 0-dim tensor): Σ |(G_U - I) diag(σ) (G_V - I)| in gram_u's dtype.

    Example:
        >>> s = sti(u.mT @ u, sigma, v.mT @ v)   # [L, K, K] x2, [L, K] -> [L]
    """
    if gram_u.shape != gram_v.shape or gram_u.shape[-1] != gram_u.shape[-2] or gram_u.dim() not in (2, 3):
        raise ValueError(f"gram_u and gram_v must both be [L, K, K], got {tuple(gram_u.shape)}, {tuple(gram_v.shape)}")
    if sigma.shape != gram_u.shape[:-1]:
        raise ValueError(f"sigma must be {tuple(gram_u.shape[:-1])}, got {tuple(sigma.shape)}")
    dtype = gram_u.dtype
    precision = resolve_precision(torch.float64 if dtype == torch.float64 else torch.float32, None)
    check_device(gram_u, sigma, gram_v, out)
    check_no_overlap(out, gram_u=gram_u, sigma=sigma, gram_v=gram_v)
    batch = gram_u.shape[:-2]
    if out is None:
        out = torch.empty(batch, dtype=dtype, device=gram_u.device)
    elif tuple(out.shape) != tuple(batch) or out.dtype != dtype:
        raise ValueError(f"out must be {tuple(batch)} {dtype}, got {tuple(out.shape)} {out.dtype}")
    gu = gram_u if gram_u.dim() == 3 else gram_u[None]
    gv = gram_v if gram_v.dim() == 3 else gram_v[None]
    s = sigma if sigma.dim() == 2 else sigma[None]
    layers, size = gu.shape[0], gu.shape[-1]
    if layers == 0:
        return out
    if size == 0:
        return out.zero_()
    config = _sti_config(generation(gu.device), size, precision)
    block = config.kwargs["BLOCK"]
    partials = torch.empty(layers, triton.cdiv(size, block) ** 2, dtype=dtype, device=gu.device)
    _sti_kernel[(partials.shape[1], layers)](
        gu, s, gv, partials, size, *gu.stride(), *s.stride(), *gv.stride(), partials.stride(0),
        ACC_FP64=precision == "fp64", num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs)
    torch.sum(partials, dim=-1, out=out.view(layers))
    return out
