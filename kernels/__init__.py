"""Triton kernels of the TSV-M hot path, installed as ``tsv_fast.kernels`` (one op per module).

=================  ==========================================================  ====================
module             op                                                          plain twin
=================  ==========================================================  ====================
``task_gram``      G = ΔᵀΔ (or ΔΔᵀ) per task, Δ = W_ft - W_pre formed in-kernel  ``task_gram_ref``
``stack_gram``     G = XᵀX of factor stacks X [L, m, K]                         ``stack_gram_ref``
``sti``            Σ |(G_U - I) diag(σ) (G_V - I)| per layer, product never stored ``sti_ref``
``reconstruct``    W = W_pre + α·A Bᵀ with add, scale and cast fused              ``reconstruct_ref``
=================  ==========================================================  ====================

This file imports nothing: each module imports triton itself, so ``import tsv_fast.kernels`` never
fails without triton and never compiles or touches CUDA. Importing a module decorates its kernels;
set ``TRITON_INTERPRET=1`` *before* that import to run them on CPU tensors.
"""

__all__ = ["task_gram", "stack_gram", "sti", "reconstruct"]
