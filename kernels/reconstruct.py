"""Fused reconstruction: W = base + α · A Bᵀ, added, scaled and cast in one write.

Math: for every layer l, W[l] = base[l] + α · A[l] B[l]ᵀ with A [L, m, K] = U⊥ diag(σ) and
B [L, n, K] = V⊥ (TSV-M), or Uᵢ diag(σᵢ) and Vᵢ (TSV-C). The GEMM accumulates in A's dtype
(float64 -> fp64; float32 -> IEEE fp32 by default, or 3xTF32), the epilogue scales by α, adds the
base (read in its own dtype, e.g. bf16) and casts once to the output dtype: the update A Bᵀ is
never written to memory, and W is written exactly once.

α is passed as a one-element tensor in the accumulator dtype (a Python float would reach the
kernel as fp32 and round α for float64 work).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (autotuned, check_device, check_no_overlap, fp64_operand, generation, pipeline_stages,
                      resolve_precision)


@triton.jit
def _reconstruct_kernel(a_ptr, b_ptr, base_ptr, alpha_ptr, out_ptr, rows, cols, inner,
                        sa_l, sa_r, sa_k, sb_l, sb_r, sb_k, sw_l, sw_r, sw_c, so_l, so_r, so_c,
                        HAS_BASE: tl.constexpr, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """out[l] = (base[l] + alpha · A[l] B[l]ᵀ).to(out dtype).   Grid: (tiles of [rows, cols], L)."""
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    # Grouped tile order: GROUP_M row-tiles share their B column panels in L2.
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    a_ptr += layer * sa_l
    b_ptr += layer * sb_l
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_n = offs_n < cols
    row = offs_m.to(tl.int64)
    col = offs_n.to(tl.int64)
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < inner
        a = tl.load(a_ptr + row[:, None] * sa_r + k[None, :] * sa_k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + col[None, :] * sb_r + k[:, None] * sb_k, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if ACC_FP64:
            acc = tl.dot(a.to(tl.float64), b.to(tl.float64), acc, out_dtype=tl.float64)
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)

    acc = acc * tl.load(alpha_ptr)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BASE:
        base = tl.load(base_ptr + layer * sw_l + row[:, None] * sw_r + col[None, :] * sw_c, mask=mask, other=0.0)
        acc += base.to(acc.dtype)
    tl.store(out_ptr + layer * so_l + row[:, None] * so_r + col[None, :] * so_c,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _reconstruct_configs(gen: int, mode: str) -> list[triton.Config]:
    """Short autotune lists per GPU generation and accumulation mode (why each exists inline)."""
    if gen == 0:  # interpreter: one config with few programs
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    stages = pipeline_stages(gen)
    if mode == "fp64":
        return [
            # fp64 DMMA (sm80/sm90) or FMA: 64x64 tiles fit the doubled register footprint.
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=stages),
            # Tall outputs (11008 x 4096): taller tiles reuse each B panel more.
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8,
                          num_stages=max(2, stages - 1)),
        ]
    if mode == "tf32x3":
        return [
            # Tensor-core tiles: the classic 128x128 GEMM tile, 8 warps.
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8,
                          num_stages=stages),
            # 128x64 when the grid of 128x128 tiles leaves SMs idle (768-wide layers).
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=stages),
        ]
    return [  # "ieee": FMA path; register-bound, so moderate tiles
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=stages),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=stages),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8, num_stages=stages),
    ]


def reconstruct(base: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0,
                out_dtype: torch.dtype | None = None, input_precision: str | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """W = base + α · A Bᵀ with the epilogue fused (one write of W).

    Args:
        base: [L, m, n] or [m, n] (any dtype, any strides) or None.
        a: [L, m, K] or [m, K], float32 or float64 (the accumulation dtype).
        b: [L, n, K] or [n, K], read in its own dtype and converted to A's.
        alpha: scale of the update.
        out_dtype: float32, bfloat16, float16 or float64; default base's dtype (A's without a base).
        input_precision: float32 A only: "ieee" (default) or "tf32x3".
        out: optional preallocated output of the returned shape and dtype (any strides).

    Returns:
        [L, m, n] (or [m, n]) in ``out_dtype``.

    Example:
        >>> w = reconstruct(w_pre, u_orth * sigma[:, None, :], v_orth, alpha=1.0, out_dtype=torch.bfloat16)
    """
    if a.dim() not in (2, 3) or b.dim() != a.dim() or a.shape[-1] != b.shape[-1] or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"a [L, m, K] and b [L, n, K] do not match: {tuple(a.shape)}, {tuple(b.shape)}")
    shape = (*a.shape[:-1], b.shape[-2])
    if base is not None and tuple(base.shape) != shape:
        raise ValueError(f"base must be {shape}, got {tuple(base.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"a must be float32 or float64 (the accumulation dtype), got {a.dtype}")
    precision = resolve_precision(a.dtype, input_precision)
    out_dtype = out_dtype or (base.dtype if base is not None else a.dtype)
    check_device(base, a, b, out)
    check_no_overlap(out, base=base, a=a, b=b)
    if precision == "fp64":
        b = fp64_operand(b)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=a.device)
    elif tuple(out.shape) != shape or out.dtype != out_dtype:
        raise ValueError(f"out must be {shape} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    a3, b3, o3 = (a, b, out) if a.dim() == 3 else (a[None], b[None], out[None])
    w3 = None if base is None else (base if base.dim() == 3 else base[None])
    layers, rows, inner = a3.shape
    cols = b3.shape[1]
    if layers * rows * cols == 0:
        return out
    alpha_t = torch.full((1,), alpha, dtype=a.dtype, device=a.device)
    gen = generation(a.device)
    kernel = autotuned(_reconstruct_kernel, _reconstruct_configs, ("rows", "cols", "inner"), gen, precision)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]), layers)
    sw = w3.stride() if w3 is not None else (0, 0, 0)
    kernel[grid](a3, b3, w3 if w3 is not None else o3, alpha_t, o3, rows, cols, inner,
                 *a3.stride(), *b3.stride(), *sw, *o3.stride(),
                 HAS_BASE=w3 is not None, ACC_FP64=precision == "fp64", PRECISION=precision)
    return out
