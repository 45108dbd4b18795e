"""Helpers shared by the kernel modules: interpreter detection, GPU generation, autotune builders.

Autotune lists are chosen per GPU generation at the first launch on a device (never at import, so
importing a kernel module never touches CUDA) and cached per (kernel, generation). Under
``TRITON_INTERPRET=1`` a single small config is used: the interpreter runs every program instance
in numpy, so autotuning there would only multiply the test time.
"""
from __future__ import annotations

import functools
import os
import re

import torch
import triton

#: Accumulation modes of the GEMM-like kernels. "fp64": operands converted to float64, float64
#: accumulator. "ieee": float32 operands, IEEE float32 products (FMA path). "tf32x3": float32
#: operands split into 3 TF32 products on tensor cores (about fp32 accuracy). Plain "tf32" is
#: refused on purpose: the TSV stacks are ill-conditioned (DESIGN.md §2).
PRECISIONS = ("fp64", "ieee", "tf32x3")


#: The installed Triton as (major, minor); the supported range is stated in pyproject.toml.
TRITON_VERSION = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])


def needs_fp64_upcast() -> bool:
    """Triton < 3.9 cannot feed 16-bit loads into a float64 ``tl.dot`` ("fp64 don't support largeK
    MMA", fixed upstream in 3.9; no in-kernel conversion avoids it on 3.6), so such operands are
    upcast to float32 on the host before launch: one extra copy, exact."""
    return TRITON_VERSION < (3, 9)


def fp64_operand(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a float64-``tl.dot`` operand this Triton can compile (see needs_fp64_upcast)."""
    if t is not None and t.dtype in (torch.bfloat16, torch.float16) and needs_fp64_upcast():
        return t.float()
    return t


def first_config_only() -> bool:
    """TSV_FAST_TRITON_AUTOTUNE=0: launch the first config of each list, never autotune (cold-cache
    runs such as the GPU acceptance check, where compiling every config would cost minutes)."""
    return os.environ.get("TSV_FAST_TRITON_AUTOTUNE", "1").strip().lower() in ("0", "false", "no", "off")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def check_no_overlap(out: torch.Tensor | None, **inputs: torch.Tensor | None) -> None:
    """Refuse an ``out`` whose memory overlaps an input: the kernels read inputs while writing
    ``out``, and the autotuner launches them several times on the live output (base += α·ABᵀ
    would be applied once per config tried)."""
    if out is None or out.numel() == 0:
        return
    lo, hi = _byte_span(out)
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or t.device != out.device:
            continue
        t_lo, t_hi = _byte_span(t)
        if lo < t_hi and t_lo < hi:
            raise ValueError(f"out overlaps {name} in memory; in-place use is not supported (write to a "
                             f"separate buffer and copy)")


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


def autotuned(kernel, make_configs, key: tuple[str, ...], gen: int, mode: str):
    """``kernel`` wrapped in triton.autotune with ``make_configs(gen, mode)``; cached per generation
    (and per TSV_FAST_TRITON_AUTOTUNE setting: the first config alone when it is 0).

    The autotune key is made of shape arguments only (never pointers or strides), so each layer
    shape is tuned once and reused by every layer and task of that shape.
    """
    return _autotuned(kernel, make_configs, key, gen, mode, first_config_only())


@functools.lru_cache(maxsize=None)
def _autotuned(kernel, make_configs, key, gen, mode, first_only):
    configs = make_configs(gen, mode)
    return triton.autotune(configs=configs[:1] if first_only else configs, key=list(key))(kernel)
