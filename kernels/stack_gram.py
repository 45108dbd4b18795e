"""Gram of concatenated factor stacks: G = XᵀX for X [L, m, K].

Math: G[l] = X[l]ᵀ X[l] ([K, K]), the hub of TSV-M (polar factor U G^(-1/2), κ(U), STI). Only
tiles on and above the diagonal are computed and mirrored in the kernel; the K×K diagonal blocks of
a TSV stack are I in exact arithmetic but are computed anyway (they carry the rounding of U).

Precision: float64 stacks (the engine's) accumulate in float64; float32 stacks in IEEE fp32
(default) or 3xTF32 (``input_precision="tf32x3"``), or in float64 with ``out_dtype=torch.float64``.
The Gram kernel is the one of ``task_gram`` with no pretrained operand and no side choice.
"""
from __future__ import annotations

import torch

from ._common import check_device, check_no_overlap, fp64_operand, resolve_precision
from .task_gram import gram_launch


def stack_gram(stack: torch.Tensor, *, out_dtype: torch.dtype | None = None, input_precision: str | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """G = XᵀX of factor stacks.

    Args:
        stack: [L, m, K] or [m, K] (any strides); float64 or float32 (bf16/fp16 are read too).
        out_dtype: accumulation and output dtype; default float64 for float64 stacks, else float32.
        input_precision: float32 accumulation only: "ieee" (default) or "tf32x3".
        out: optional preallocated [..., K, K] output of ``out_dtype`` (any strides).

    Returns:
        [..., K, K], exactly symmetric.

    Example:
        >>> g_u = stack_gram(u)                  # u [L, 3072, 768] fp64 -> [L, 768, 768] fp64
    """
    if stack.dim() not in (2, 3):
        raise ValueError(f"stack must be [L, m, K] or [m, K], got shape {tuple(stack.shape)}")
    if out_dtype is None:
        out_dtype = torch.float64 if stack.dtype == torch.float64 else torch.float32
    precision = resolve_precision(out_dtype, input_precision)
    check_device(stack, out)
    check_no_overlap(out, stack=stack)
    if precision == "fp64":
        stack = fp64_operand(stack)
    side = stack.shape[-1]
    shape = (*stack.shape[:-2], side, side)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=stack.device)
    elif tuple(out.shape) != shape or out.dtype != out_dtype:
        raise ValueError(f"out must be {shape} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    x4 = stack.unsqueeze(1) if stack.dim() == 3 else stack[None, None]
    o4 = out.unsqueeze(1) if out.dim() == 3 else out[None, None]
    gram_launch(x4, None, o4, transpose=False, precision=precision)
    return out
