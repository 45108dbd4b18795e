"""Benchmark: stack Gram XᵀX (upper tiles, mirrored in-kernel) vs cuBLAS (torch bmm).

Stacks X [L, side, K] with K = T·int(r/T) for both sides of each layer shape (U: m rows, V: n
rows), L = 4 layers per launch; float64 (the engine's) and float32 (IEEE / 3xTF32 vs IEEE SGEMM).
Usage: python bench/bench_stack_gram.py
"""
from __future__ import annotations

import torch

from _harness import DEV, LAYER_SHAPES, TASK_COUNTS, Recorder, free, kernel, rel_err, require_cuda, time_ms

LAYERS = 4


def main(roofs: dict | None = None) -> Recorder:
    require_cuda("bench_stack_gram")
    stack_gram = kernel("stack_gram").stack_gram
    rec = Recorder("stack_gram", roofs)
    for name, (m, n) in LAYER_SHAPES.items():
        for tasks in TASK_COUNTS:
            big_k = tasks * (min(m, n) // tasks)
            for side, label in sorted({(m, "U"), (n, "V")}):
                x = torch.randn(LAYERS, side, big_k, dtype=torch.float64, device=DEV) / side ** 0.5
                flops = 2.0 * LAYERS * side * big_k * big_k
                shape = f"{name} {label} {side}x{big_k}"
                want = x.mT @ x
                base = time_ms(lambda: x.mT @ x)
                rec.add("stack_gram", "torch bmm", shape, tasks, "fp64", "fp64", base, flops,
                        x.numel() * 8 + want.numel() * 8, "gemm_fp64_tflops")
                out = torch.empty_like(want)
                t = time_ms(lambda: stack_gram(x, out=out))
                rec.add("stack_gram", "triton", shape, tasks, "fp64", "fp64", t, flops, x.numel() * 8 + out.numel() * 8,
                        "gemm_fp64_tflops", base["ms"], rel_err(out, want))
                x32 = x.float()
                base32 = time_ms(lambda: x32.mT @ x32)
                rec.add("stack_gram", "torch bmm", shape, tasks, "fp32", "ieee", base32, flops,
                        x32.numel() * 4 + want.numel() * 4, "gemm_fp32_ieee_tflops",
                        max_rel_err=rel_err(x32.mT @ x32, want))
                out32 = torch.empty(want.shape, dtype=torch.float32, device=DEV)
                for precision, roof in [("ieee", "gemm_fp32_ieee_tflops"), ("tf32x3", "gemm_tf32_tflops")]:
                    t = time_ms(lambda: stack_gram(x32, input_precision=precision, out=out32))
                    rec.add("stack_gram", "triton", shape, tasks, "fp32", precision, t, flops,
                            x32.numel() * 4 + out32.numel() * 4, roof, base32["ms"], rel_err(out32, want))
                del x, x32, want, out, out32
                free()
    rec.write()
    return rec


if __name__ == "__main__":
    main()
