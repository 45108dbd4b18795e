"""One dispatch point for the compute backends.

Every backend implements the same batched ops (shapes written as ``[L, ...]`` for L same-shape
layers and ``[L, T, ...]`` for T tasks per layer):

``task_factors(finetuned [L,T,m,n], pretrained [L,m,n] | None, k)``
    top-k singular triplets of every Δ = finetuned - pretrained, float64: U [L,T,m,k], σ [L,T,k],
    V [L,T,n,k]; numerically zero triplets come back as zero columns with σ = 0.
``orthogonalize(stack [L,m,K] float64)``
    polar factor X (XᵀX)^(-1/2) restricted to the numerical range, with the Gram and its eigenvalues.
``sti(gram_u [L,K,K], sigma [L,K], gram_v [L,K,K])``
    Singular Task Interference per layer.
``reconstruct(base [L,m,n] | None, a [L,m,K], b [L,n,K], alpha, out_dtype)``
    base + α·A Bᵀ, cast once.

``TorchBackend`` is the always-available implementation; faster backends subclass it and replace
only the ops they accelerate. Its ``task_factors`` has two routes (``TorchBackend.topk_route``): the
float64 Gram + MRRR eigensolver, and a certified block Krylov iteration with float32 GEMMs
(``tsv_fast.backends.krylov``; uncertified tasks are recomputed by the Gram route). ``auto`` takes
the Krylov route only on device types listed in ``torch_backend.KRYLOV_AUTO`` (none so far: measured
slower than the Gram route on real task vectors on the CPU, unmeasured on CUDA);
``TSV_FAST_TOPK=gram|krylov|auto`` overrides it. On the CPU both routes spread the tasks of a call
over ``torch.get_num_threads()`` single-threaded workers (torch ops and the LAPACK calls of
``_lapack`` release the GIL). ``resolve_backend("auto", device)`` takes the first backend of
``AUTO_ORDER`` that can serve the device; an explicitly named backend that cannot serve raises with
its reasons. ``TSV_FAST_BACKEND`` overrides the default ``"auto"``.
"""
from __future__ import annotations

import importlib
import os

import torch

from .torch_backend import Backend, ExactBackend, TorchBackend

#: name -> "module:class"; modules are imported only when the backend is asked for.
REGISTRY = {
    "torch": "tsv_fast.backends.torch_backend:TorchBackend",
    "triton": "tsv_fast.backends.triton:TritonBackend",
    "cusolver": "tsv_fast.backends.cusolver:CusolverBackend",
}

#: Preference of ``auto`` per device type, fastest first. The triton and cusolver backends are
#: tested only on the CPU interpreter / compile checks so far: they join ``auto`` on CUDA once the
#: GPU parity tests pass and bench/results shows where they win. Until then ask for them by name.
AUTO_ORDER = {
    "cuda": ("torch",),
    "cpu": ("torch",),
}


def _load(name: str) -> Backend | str:
    """The backend instance, or a string saying why it cannot even be imported."""
    module_name, class_name = REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a missing optional dependency must not break import tsv_fast
        return f"{name}: cannot import {module_name} ({type(exc).__name__}: {exc})"
    return getattr(module, class_name)()


def unavailable_reasons(name: str, device: torch.device | str = "cpu") -> list[str]:
    """Why backend ``name`` cannot serve ``device`` (empty list: it can)."""
    if name not in REGISTRY:
        return [f"unknown backend {name!r}; choose one of {sorted(REGISTRY)} or 'auto'"]
    backend = _load(name)
    if isinstance(backend, str):
        return [backend]
    return backend.unavailable_reasons(torch.device(device))


def resolve_backend(name: str | None = None, device: torch.device | str = "cpu") -> Backend:
    """The backend that will run on ``device``: ``name`` itself, or the best available for ``auto``."""
    device = torch.device(device)
    name = name or os.environ.get("TSV_FAST_BACKEND", "auto")
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if not unavailable_reasons(candidate, device):
                return _load(candidate)
        return TorchBackend()
    reasons = unavailable_reasons(name, device)
    if reasons:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: " + "; ".join(reasons))
    return _load(name)


def available_backends(device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """Every backend with its reasons for not serving ``device`` (empty: available)."""
    return {name: unavailable_reasons(name, device) for name in REGISTRY}


__all__ = ["Backend", "TorchBackend", "ExactBackend", "REGISTRY", "AUTO_ORDER", "resolve_backend", "unavailable_reasons",
           "available_backends"]
