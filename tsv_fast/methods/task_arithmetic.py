"""Task Arithmetic (Ilharco et al., ICLR 2023): W = W_pre + α Σₜ Δₜ, every key elementwise."""
from __future__ import annotations

from .base import Method, running_sum


class TaskArithmetic(Method):
    name = "ta"
    factored = False
    uses_rank_rule = False

    def elementwise(self, key, base, deltas, ctx):
        if not base.is_floating_point():
            return base.clone()
        total = running_sum(deltas)
        return (base.to(total.dtype) + ctx.options.alpha * total).to(ctx.out_dtype(base.dtype))
