"""Helpers shared by the kernel modules: interpreter detection, GPU generation, autotune builders.

Autotune lists are chosen per GPU generation at the first launch on a device (never at import, so
importing a kernel module never touches CUDA) and cached per (kernel, generation). Under
``TRITON_INTERPRET=1`` a single small config is used: the interpreter runs every program instance
in numpy, so autotuning there would only multiply the test time.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

#: Accumulation modes of the GEMM-like kernels. "fp64": operands converted to float64, float64
#: accumulator. "ieee": float32 operands, IEEE float32 products (FMA path). "tf32x3": float32
#: operands split into 3 TF32 products on tensor cores (about fp32 accuracy). Plain "tf32" is
#: refused on purpose: the TSV stacks are ill-conditioned (DESIGN.md §2).
PRECISIONS = ("fp64", "ieee", "tf32x3")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def check_device(*tensors: torch.Tensor | None) -> None:
    """All tensors on one device that Triton can run on (CUDA, or CPU under the interpreter)."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise RuntimeError("Triton kernels need a CUDA device; CPU tensors run only with TRITON_INTERPRET=1")


def resolve_precision(compute_dtype: torch.dtype, input_precision: str | None) -> str:
    """Accumulation mode for ``compute_dtype``: float64 -> "fp64"; float32 -> "ieee" or "tf32x3"."""
    if compute_dtype == torch.float64:
        if input_precision not in (None, "fp64", "ieee"):
            raise ValueError(f"input_precision={input_precision!r} does not apply to float64 accumulation")
        return "fp64"
    if compute_dtype == torch.float32:
        precision = input_precision or "ieee"
        if precision not in ("ieee", "tf32x3"):
            raise ValueError(f"input_precision must be 'ieee' or 'tf32x3' for float32 accumulation, got "
                             f"{precision!r} (plain TF32 is too inexact for TSV stacks, see DESIGN.md §2)")
        return precision
    raise ValueError(f"accumulation dtype must be torch.float32 or torch.float64, got {compute_dtype}")


def generation(device: torch.device) -> int:
    """Compute-capability major of ``device`` (0 on the interpreter): 9 Hopper, 8 Ampere/Ada, 7 Volta/Turing."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_capability(device)[0]


def pipeline_stages(gen: int) -> int:
    """Software-pipelining depth: Hopper's 228 KB of shared memory holds 4 stages of a 128-wide
    fp32 tile pair, Ampere/Ada 3, older parts 2."""
    return 4 if gen >= 9 else 3 if gen >= 8 else 2


@functools.lru_cache(maxsize=None)
def autotuned(kernel, make_configs, key: tuple[str, ...], gen: int, mode: str):
    """``kernel`` wrapped in triton.autotune with ``make_configs(gen, mode)``; cached per generation.

    The autotune key is made of shape arguments only (never pointers or strides), so each layer
    shape is tuned once and reused by every layer and task of that shape.
    """
    return triton.autotune(configs=make_configs(gen, mode), key=list(key))(kernel)
