"""The Triton backend: the torch route with its GEMM-shaped steps replaced by fused kernels.

Replaced (tsv_fast.kernels): the per-task Gram (Δ = W_ft - W_pre formed in registers, float64
accumulation), the stack Grams (float64), STI (product never stored) and the reconstruction
(GEMM + α + base + cast in one write). Kept from TorchBackend: the eigensolvers (torch.linalg.eigh
in float64), the small G^(-1/2) products and the bookkeeping.

Precision choices (DESIGN.md §2):
* task Gram: float64 accumulation. The Gram squares κ(Δ) and feeds a float64 eigensolver; an fp32
  Gram (even IEEE) loses the tail of a decaying spectrum. The kernel reads bf16/fp16/fp32 weights
  and converts in registers, so the fp64 cost is in the MMAs only, never in memory traffic.
* stack Grams and STI: float64, like the torch backend (the stacks reach κ ≈ 1e7).
* reconstruction: the engine's compute dtype (A, B are float32 by default, float64 on request);
  float32 uses IEEE products by default (``gemm_precision="ieee"``); ``"tf32x3"`` (env
  ``TSV_FAST_TRITON_GEMM=tf32x3``) is faster on tensor cores with near-fp32 accuracy, to adopt
  once the H100 benchmarks and the GPU parity tests confirm it. Plain TF32 is never used.

On CPU the backend serves only under ``TRITON_INTERPRET=1`` (for tests; very slow).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re

import torch
from torch import Tensor

from .torch_backend import F64, TorchBackend, factors_from_projection


#: The oldest Triton the kernels are tested with (CI runs it beside the newest; pyproject.toml).
OLDEST_TRITON = (3, 6)


def triton_version() -> tuple[int, ...] | None:
    """The installed triton's (major, minor), read from its metadata (triton is not imported)."""
    try:
        return tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version("triton"))[:2])
    except importlib.metadata.PackageNotFoundError:
        return None


def kernels_package():
    """The ``tsv_fast.kernels`` package (installed from kernels/; imports nothing heavy)."""
    return importlib.import_module("tsv_fast.kernels")


def kernel_module(op: str):
    """``tsv_fast.kernels.<op>`` (imports triton and decorates the op's kernels)."""
    return importlib.import_module(f"tsv_fast.kernels.{op}")


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, gemm_precision: str | None = None) -> None:
        self.gemm_precision = gemm_precision or os.environ.get("TSV_FAST_TRITON_GEMM", "ieee")
        if self.gemm_precision not in ("ieee", "tf32x3"):
            raise ValueError(f"gemm_precision must be 'ieee' or 'tf32x3', got {self.gemm_precision!r}")

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        reasons = []
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton: the triton package is not installed (pip install triton)")
        elif (version := triton_version()) is not None and version < OLDEST_TRITON:
            reasons.append(f"triton: version {'.'.join(map(str, version))} is older than "
                           f"{'.'.join(map(str, OLDEST_TRITON))}, the oldest supported")
        device = torch.device(device)
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
        if device.type == "cpu":
            if not interpret:
                reasons.append("triton: device is CPU and TRITON_INTERPRET != '1' (the interpreter is for tests only)")
        elif device.type == "cuda":
            if not torch.cuda.is_available():
                reasons.append("triton: CUDA device requested but torch.cuda.is_available() is False")
            elif torch.version.hip is None and torch.cuda.get_device_capability(device)[0] < 7:
                reasons.append("triton: needs compute capability >= 7.0")
        else:
            reasons.append(f"triton: device type {device.type!r} is not supported "
                           f"(cuda, or cpu under TRITON_INTERPRET=1)")
        return reasons

    # -- building blocks ---------------------------------------------------------------------------
    def task_gram(self, delta: Tensor) -> Tensor:
        """[..., m, n] with m >= n -> ΔᵀΔ [..., n, n] float64 (fused kernel, fp64 accumulation)."""
        return kernel_module("task_gram").task_gram(delta, out_dtype=F64)

    def stack_gram(self, stack: Tensor) -> Tensor:
        return kernel_module("stack_gram").stack_gram(stack, out_dtype=F64)

    # -- the ops of the merge ----------------------------------------------------------------------
    def task_factors(self, finetuned: Tensor, pretrained: Tensor | None, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k triplets of every Δ = finetuned - pretrained from its fused float64 Gram.

        finetuned [L, T, m, n], pretrained [L, m, n] or None -> U [L,T,m,k], σ [L,T,k], V [L,T,n,k].
        Same math as TorchBackend.task_factors, but the Gram reads the checkpoints directly (Δ is
        never stored) and the products Δ·V are formed one task at a time, so the float64 copy of
        Δ is [L, m, n] instead of [L, T, m, n].
        """
        gram = kernel_module("task_gram").task_gram(finetuned, pretrained, out_dtype=F64)
        wide = finetuned.shape[-2] < finetuned.shape[-1]
        right = self.topk_eigh(gram, k)  # [L, T, side, k]: eigenvectors of the smaller-side Gram
        left = torch.empty(*finetuned.shape[:2], max(finetuned.shape[-2:]), k, dtype=F64, device=finetuned.device)
        for t in range(finetuned.shape[1]):
            delta = finetuned[:, t].to(F64)
            if pretrained is not None:
                delta = delta - pretrained.to(F64)
            if wide:
                delta = delta.mT
            torch.matmul(delta, right[:, t], out=left[:, t])
        return factors_from_projection(left, right, wide)

    def sti(self, gram_u: Tensor, sigma: Tensor, gram_v: Tensor) -> Tensor:
        return kernel_module("sti").sti(gram_u, sigma.to(gram_u.dtype), gram_v.to(gram_u.dtype))

    def reconstruct(self, base: Tensor | None, a: Tensor, b: Tensor, alpha: float,
                    out_dtype: torch.dtype) -> Tensor:
        precision = self.gemm_precision if a.dtype == torch.float32 else None
        return kernel_module("reconstruct").reconstruct(base, a, b.to(a.dtype), alpha=alpha, out_dtype=out_dtype,
                                                        input_precision=precision)
