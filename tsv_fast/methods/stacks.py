"""What TSV-M and Iso-CTS share: orthogonalise the stacked singular vectors of a chunk and rebuild."""
from __future__ import annotations

import math

from torch import Tensor

from ..engine.report import LayerReport, kappa_and_rank
from .base import merged_outputs


def orthogonal_merge(chunk, ctx, u: Tensor, sigma: Tensor, v: Tensor, spectrum: Tensor | None = None
                     ) -> list[tuple[str, object, LayerReport]]:
    """base + α·U⊥ diag(s) V⊥ᵀ for every layer of ``chunk`` (or that update, factored: see
    ``base.merged_outputs``), with s = ``spectrum`` or σ.

    U [L, m, K], σ [L, K], V [L, n, K] float64 stacks. The polar factors come from the backend
    (float64 Gram-space polar, partial isometry on the numerical range); each layer's report holds
    κ(U), κ(V), the numerical ranks and, when the run asks for it, the STI of the stacks with σ.
    """
    backend = ctx.backend
    if u.shape[-1] == 0:  # no task changes these layers (e.g. adapters whose updates cancel)
        return merged_outputs(chunk, ctx, u, v, [LayerReport(key, tuple(chunk.shape), chunk.rank) for key in chunk.keys])
    u_orth, gram_u, evals_u = backend.orthogonalize(u)
    v_orth, gram_v, evals_v = backend.orthogonalize(v)
    sti = backend.sti(gram_u, sigma, gram_v).tolist() if ctx.compute_sti else [math.nan] * len(chunk.keys)
    scale = sigma if spectrum is None else spectrum
    kappa_u, rank_u = kappa_and_rank(evals_u)
    kappa_v, rank_v = kappa_and_rank(evals_v)
    layers = [LayerReport(key, tuple(chunk.shape), chunk.rank, kappa_u[i], kappa_v[i], rank_u[i], rank_v[i], sti[i])
              for i, key in enumerate(chunk.keys)]
    return merged_outputs(chunk, ctx, u_orth * scale.unsqueeze(1), v_orth, layers)
