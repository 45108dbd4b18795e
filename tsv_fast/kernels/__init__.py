"""Triton kernels of the TSV-M hot path, installed as ``tsv_fast.kernels`` (one op per module).

=================  ==========================================================  ====================
module             op                                                          plain twin
=================  ==========================================================  ====================
``task_gram``      G = ΔᵀΔ (or ΔΔᵀ) per task, Δ = W_ft - W_pre formed in-kernel  ``task_gram_ref``
``stack_gram``     G = XᵀX of factor stacks X [L, m, K]                         ``stack_gram_ref``
``sti``            Σ |(G_U - I) diag(σ) (G_V - I)| per layer, product never stored ``sti_ref``
``reconstruct``    W = W_pre + α·A Bᵀ with add, scale and cast fused              ``reconstruct_ref``
=================  ==========================================================  ====================

This file imports nothing heavy: each module imports triton itself, so ``import tsv_fast.kernels``
never fails without triton and never compiles or touches CUDA. Importing a module decorates its
kernels; set ``TRITON_INTERPRET=1`` *before* that import to run them on CPU tensors.

Where the modules live: the repository keeps them in its top-level ``kernels/`` folder (the design's
layout), which has no ``__init__.py`` on purpose, so that it can never shadow the unrelated
``kernels`` package of Hugging Face (transformers >= 5 imports it) when the clone root is on
``sys.path``. A wheel copies them in here (setup.py); a source tree or editable install reaches them
through ``__path__`` below.
"""
from pathlib import Path as _Path

__all__ = ["task_gram", "stack_gram", "sti", "reconstruct"]

_SOURCE = _Path(__file__).resolve().parents[2] / "kernels"
if not (_Path(__file__).parent / "task_gram.py").is_file() and (_SOURCE / "task_gram.py").is_file():
    __path__.append(str(_SOURCE))  # noqa: F821 - a package's __path__
