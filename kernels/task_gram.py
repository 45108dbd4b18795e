"""Per-task Gram of the task matrices, Δ formed inside the kernel: G = ΔᵀΔ (or ΔΔᵀ).

Math: for every layer l and task t, Δ = finetuned[l, t] - pretrained[l] ([m, n]) and
G[l, t] = ΔᵀΔ ([n, n]) when m >= n, else ΔΔᵀ ([m, m]): the Gram on the smaller side, whose
eigenvectors are the right (resp. left) singular vectors of Δ. Δ lives only in registers.

Precision (DESIGN.md §2): the Gram squares the condition number and feeds a float64 eigensolver,
so the default is a float64 accumulator (operands converted to fp64 after the load, the difference
taken in fp64: exact for fp32/bf16/fp16 inputs). ``out_dtype=torch.float32`` accumulates in fp32
with ``input_precision="ieee"`` (default) or ``"tf32x3"``; plain TF32 is refused.

Work: only the tiles on and above the diagonal are computed; each off-diagonal tile is written
twice (as itself and, through swapped output strides, as its mirror), so the output is exactly
symmetric and complete. The same kernel serves ``stack_gram`` (no pretrained, no side choice).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (autotuned, check_device, check_no_overlap, fp64_operand, generation, pipeline_stages,
                      resolve_precision)


@triton.jit
def _gram_kernel(x_ptr, base_ptr, out_ptr, rows, cols, tasks,
                 sx_l, sx_t, sx_r, sx_c,
                 sb_l, sb_t, sb_r, sb_c,
                 so_l, so_t, so_i, so_j,
                 HAS_BASE: tl.constexpr, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[l, t] = Dᵀ D for D = x[l, t] - base[l, t] viewed as [rows, cols] through its strides.

    Grid: (cdiv(cols, BLOCK_N), cdiv(cols, BLOCK_N), layers * tasks); programs below the
    diagonal exit at once.
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j < pid_i:
        return
    pid_b = tl.program_id(2)
    layer = (pid_b // tasks).to(tl.int64)
    task = (pid_b % tasks).to(tl.int64)
    # 64-bit batch offsets: L·T·m·n exceeds 2^31 elements on LLaMA-size groups.
    x_ptr += layer * sx_l + task * sx_t
    base_ptr += layer * sb_l + task * sb_t
    out_ptr += layer * so_l + task * so_t

    offs_i = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_i = offs_i < cols
    mask_j = offs_j < cols
    col_i = offs_i.to(tl.int64)
    col_j = offs_j.to(tl.int64)
    if ACC_FP64:
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + offs_r
        row = r.to(tl.int64)
        mask_r = r < rows
        m_a = mask_r[:, None] & mask_i[None, :]
        m_b = mask_r[:, None] & mask_j[None, :]
        # Both tiles are loaded row-major ([BLOCK_R, BLOCK_N]) for coalescing; the left one is
        # transposed in registers.
        a = tl.load(x_ptr + row[:, None] * sx_r + col_i[None, :] * sx_c, mask=m_a, other=0.0)
        b = tl.load(x_ptr + row[:, None] * sx_r + col_j[None, :] * sx_c, mask=m_b, other=0.0)
        if ACC_FP64:
            a = a.to(tl.float64)
            b = b.to(tl.float64)
        else:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if HAS_BASE:
            pa = tl.load(base_ptr + row[:, None] * sb_r + col_i[None, :] * sb_c, mask=m_a, other=0.0)
            pb = tl.load(base_ptr + row[:, None] * sb_r + col_j[None, :] * sb_c, mask=m_b, other=0.0)
            a -= pa.to(a.dtype)
            b -= pb.to(b.dtype)
        if ACC_FP64:
            acc = tl.dot(tl.trans(a), b, acc, out_dtype=tl.float64)
        else:
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)

    mask = mask_i[:, None] & mask_j[None, :]
    value = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + col_i[:, None] * so_i + col_j[None, :] * so_j, value, mask=mask)
    if pid_j > pid_i:
        # The mirrored tile G[j, i] = G[i, j]ᵀ: same values, output strides swapped.
        tl.store(out_ptr + col_i[:, None] * so_j + col_j[None, :] * so_i, value, mask=mask)


def _gram_configs(gen: int, mode: str) -> list[triton.Config]:
    """Short autotune lists per GPU generation and accumulation mode (why each exists inline)."""
    if gen == 0:  # interpreter: one config, large enough to keep the program count small
        return [triton.Config({"BLOCK_N": 32, "BLOCK_R": 32}, num_warps=4, num_stages=1)]
    stages = pipeline_stages(gen)
    if mode == "fp64":
        return [
            # fp64 tiles take twice the registers and shared memory of fp32: stay at 64-wide.
            triton.Config({"BLOCK_N": 64, "BLOCK_R": 16}, num_warps=4, num_stages=stages),
            # Small Grams (768 x 768 and below) have few tiles: 32-wide tiles fill the SMs.
            triton.Config({"BLOCK_N": 32, "BLOCK_R": 32}, num_warps=4, num_stages=stages),
            # Large Grams (4096 x 4096) on Hopper/Ampere DMMA: more reuse per loaded row.
            triton.Config({"BLOCK_N": 128, "BLOCK_R": 16}, num_warps=8, num_stages=max(2, stages - 1)),
        ]
    if mode == "tf32x3":
        return [
            # Tensor-core tiles: 128-wide amortises the 3 MMAs per product over more reuse; one stage
            # less than usual (4 stages of this tile pair need 224 KB on sm90, at the 227 KB limit).
            triton.Config({"BLOCK_N": 128, "BLOCK_R": 32}, num_warps=8, num_stages=max(2, stages - 1)),
            # Fallback for small Grams (fewer tiles than SMs at 128).
            triton.Config({"BLOCK_N": 64, "BLOCK_R": 32}, num_warps=4, num_stages=stages),
        ]
    return [  # "ieee": FMA path, register-bound; 64-wide tiles with 4 or 8 warps
        triton.Config({"BLOCK_N": 64, "BLOCK_R": 32}, num_warps=4, num_stages=stages),
        triton.Config({"BLOCK_N": 128, "BLOCK_R": 16}, num_warps=8, num_stages=stages),
        triton.Config({"BLOCK_N": 32, "BLOCK_R": 32}, num_warps=4, num_stages=stages),
    ]


def _as_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    """[m, n] -> [1, 1, m, n]; [T, m, n] -> [1, T, m, n]; [L, T, m, n] unchanged (views, no copy)."""
    if t.dim() < 2 or t.dim() > 4:
        raise ValueError(f"{name} must have 2 to 4 dims ([L, T, m, n]), got shape {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def gram_launch(x4: torch.Tensor, base4: torch.Tensor | None, out4: torch.Tensor, transpose: bool,
                precision: str) -> None:
    """Launch the Gram kernel: out4[l, t] = Dᵀ D, D = x4[l, t] - base4[l, t] (or Dᵀ if transpose).

    x4, base4: [L, T, m, n] (base4 may have zero strides); out4: [L, T, N, N], N = the Gram side.
    """
    layers, tasks = x4.shape[0], x4.shape[1]
    sx_r, sx_c = x4.stride(2), x4.stride(3)
    rows, cols = x4.shape[2], x4.shape[3]
    if transpose:
        rows, cols, sx_r, sx_c = cols, rows, sx_c, sx_r
    if base4 is not None:
        sb = list(base4.stride())
        if transpose:
            sb[2], sb[3] = sb[3], sb[2]
    else:
        sb = [0, 0, 0, 0]
    if layers * tasks == 0 or cols == 0:
        return
    if rows == 0:
        out4.zero_()
        return
    gen = generation(x4.device)
    kernel = autotuned(_gram_kernel, _gram_configs, ("rows", "cols"), gen, precision)
    grid = lambda meta: (triton.cdiv(cols, meta["BLOCK_N"]), triton.cdiv(cols, meta["BLOCK_N"]), layers * tasks)
    kernel[grid](x4, base4 if base4 is not None else x4, out4, rows, cols, tasks,
                 x4.stride(0), x4.stride(1), sx_r, sx_c, *sb, *out4.stride(),
                 HAS_BASE=base4 is not None, ACC_FP64=precision == "fp64", PRECISION=precision)


def task_gram(finetuned: torch.Tensor, pretrained: torch.Tensor | None = None, *,
              out_dtype: torch.dtype = torch.float64, input_precision: str | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Gram on the smaller side of every Δ = finetuned - pretrained, one fused pass.

    Args:
        finetuned: [L, T, m, n], [T, m, n] or [m, n]; float32, bfloat16 or float16 (float64 too).
            Any strides (non-contiguous views are read in place).
        pretrained: None (finetuned already holds Δ) or the task-less batch of finetuned:
            [L, m, n] for [L, T, m, n] inputs (the engine's layout), [m, n] for [T, m, n]; a tensor
            with finetuned's number of dims (e.g. [L, 1, m, n]) broadcasts as in torch.
        out_dtype: accumulation and output dtype: torch.float64 (default; exact difference,
            fp64 products) or torch.float32 (see ``input_precision``).
        input_precision: for float32 only: "ieee" (default) or "tf32x3".
        out: optional preallocated output of the returned shape and ``out_dtype`` (any strides).

    Returns:
        [..., n, n] = ΔᵀΔ when m >= n, else [..., m, m] = ΔΔᵀ; leading dims as finetuned's.

    Example:
        >>> g = task_gram(w_ft, w_pre)           # w_ft [8, 3072, 768] bf16, w_pre [3072, 768] -> [8, 768, 768] fp64
    """
    precision = resolve_precision(out_dtype, input_precision)
    check_device(finetuned, pretrained, out)
    check_no_overlap(out, finetuned=finetuned, pretrained=pretrained)
    if precision == "fp64":
        finetuned, pretrained = fp64_operand(finetuned), fp64_operand(pretrained)
    ft4 = _as_4d(finetuned, "finetuned")
    m, n = ft4.shape[-2:]
    base4 = None
    if pretrained is not None:
        if pretrained.shape[-2:] != (m, n):
            raise ValueError(f"pretrained {tuple(pretrained.shape)} does not match finetuned {tuple(finetuned.shape)}")
        pre = pretrained if pretrained.dim() == finetuned.dim() else pretrained.unsqueeze(-3)
        base4 = _as_4d(pre, "pretrained").expand(ft4.shape)  # zero strides: read once per task, never copied
    transpose = m < n
    side = min(m, n)
    shape = (*finetuned.shape[:-2], side, side)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=finetuned.device)
    elif tuple(out.shape) != shape or out.dtype != out_dtype:
        raise ValueError(f"out must be {shape} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    gram_launch(ft4, base4, _as_4d(out, "out"), transpose, precision)
    return out
