"""Task Arithmetic (Ilharco et al., ICLR 2023): W = W_pre + α Σₜ Δₜ, every key elementwise.

With factored outputs (a merged LoRA adapter) matrices are merged from the factors instead: the sum
of T low-rank updates is the low-rank [L₁ … L_T] [R₁ … R_T]ᵀ, handed to the sink factored.
"""
from __future__ import annotations

from .base import Method, merged_outputs, running_sum


class TaskArithmetic(Method):
    name = "ta"
    factored = False
    uses_rank_rule = False

    def factors(self, low_rank: bool) -> bool:
        return low_rank

    def rank(self, key, shape, num_tasks, options) -> int:
        return min(shape)  # the whole sum

    def merge_group(self, chunk, ctx):  # only with factored outputs, see factors()
        if not chunk.factored_only:  # a task stores this weight whole: the plain sum, as elementwise
            total = chunk.task_sum()
            return [(key, (chunk.base[i].to(total.dtype) + ctx.options.alpha * total[i]).to(chunk.out_dtype), None)
                    for i, key in enumerate(chunk.keys)]
        u, sigma, v = chunk.sum_factors(chunk.rank)
        return merged_outputs(chunk, ctx, u * sigma.unsqueeze(1), v)

    def elementwise(self, key, base, deltas, ctx):
        if not base.is_floating_point():
            return base.clone()
        total = running_sum(deltas)
        return (base.to(total.dtype) + ctx.options.alpha * total).to(ctx.out_dtype(base.dtype))
