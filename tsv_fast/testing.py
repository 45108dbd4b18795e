"""The one tolerance policy of tsv_fast (tests and benchmarks use it; DESIGN.md §2).

Every fast path is judged against the float64 reference by the relative Frobenius error of what it
returns. In float64 mode the bound is ``FLOAT64_BOUND``; in float32 mode it is the accuracy contract:
at most 3× the error of the authors' own float32 code on the same input, never tighter than 1e-5.
"""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT64_BOUND = 1e-6
CONTRACT_FLOOR = 1e-5
CONTRACT_FACTOR = 3.0


def rel_fro(got: Tensor, want: Tensor) -> float:
    """‖got - want‖_F / ‖want‖_F in float64 (absolute error when want is zero)."""
    got, want = got.to(torch.float64), want.to(torch.float64)
    diff = torch.linalg.vector_norm(got - want)
    scale = torch.linalg.vector_norm(want)
    return float(diff / scale) if float(scale) > 0 else float(diff)


def contract_bound(authors_error: float) -> float:
    """The float32 accuracy contract: max(1e-5, 3 × the authors' float32 error)."""
    return max(CONTRACT_FLOOR, CONTRACT_FACTOR * authors_error)


def assert_rel_close(name: str, got: Tensor, want: Tensor, bound: float) -> float:
    """Fail with the tensor's name, the error and the bound when rel_fro(got, want) > bound."""
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not bool(torch.isfinite(got).all()):
        raise AssertionError(f"{name}: contains NaN or Inf")
    error = rel_fro(got, want)
    if not error <= bound:
        raise AssertionError(f"{name}: relative Frobenius error {error:.3e} > bound {bound:.3e}")
    return error


def assert_same_result(name: str, got: Tensor, want: Tensor) -> float:
    """The same computation run elsewhere (another process, thread count or BLAS build): equal up to
    the rounding of a reordered float32 sum, and to one rounding step of a low-precision output dtype.
    Bitwise equality does not hold across thread counts (BLAS splits the sums differently)."""
    bound = max(CONTRACT_FLOOR, float(torch.finfo(want.dtype).eps)) if want.is_floating_point() else 0.0
    if not want.is_floating_point():
        if not torch.equal(got, want):
            raise AssertionError(f"{name}: integer tensors differ")
        return 0.0
    return assert_rel_close(name, got, want, bound)
