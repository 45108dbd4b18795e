"""Benchmark: fused reconstruction W = base + α·A Bᵀ (add, scale, cast in one write) vs the torch
sequence of TorchBackend: base.float(), cuBLAS baddbmm (IEEE fp32), .to(bf16).

A [L, m, K] fp32, B [L, n, K] fp32, base and output bf16, K = T·int(r/T), L = 4 (1 for LLaMA).
Reports TFLOP/s (2·m·n·K per layer) and GB/s (base + A + B read, W written).
Usage: python bench/bench_reconstruct.py
"""
from __future__ import annotations

import torch

from _harness import DEV, LAYER_SHAPES, TASK_COUNTS, Recorder, free, kernel, rel_err, require_cuda, time_ms


def torch_reconstruct(base, a, b, alpha):
    return torch.baddbmm(base.to(a.dtype), a, b.mT, alpha=alpha).to(base.dtype)


def main(roofs: dict | None = None) -> Recorder:
    require_cuda("bench_reconstruct")
    reconstruct = kernel("reconstruct").reconstruct
    rec = Recorder("reconstruct", roofs)
    for name, (m, n) in LAYER_SHAPES.items():
        layers = 1 if m * n > 2 ** 25 else 4
        for tasks in TASK_COUNTS:
            big_k = tasks * (min(m, n) // tasks)
            base = (torch.randn(layers, m, n, device=DEV) * 0.02).bfloat16()
            a = torch.randn(layers, m, big_k, device=DEV) * 1e-3
            b = torch.linalg.qr(torch.randn(layers, n, big_k, device=DEV))[0]
            flops = 2.0 * layers * m * n * big_k
            moved = base.numel() * 2 * 2 + (a.numel() + b.numel()) * 4
            shape = f"{name} {m}x{n} K={big_k}"
            want = torch.baddbmm(base.double(), a.double(), b.double().mT)
            reps = 5 if flops > 5e11 else 15
            t0 = time_ms(lambda: torch_reconstruct(base, a, b, 1.0), reps=reps)
            rec.add("reconstruct", "torch baddbmm + cast", shape, tasks, "fp32->bf16", "ieee", t0, flops, moved,
                    "gemm_fp32_ieee_tflops", max_rel_err=rel_err(torch_reconstruct(base, a, b, 1.0), want))
            out = torch.empty_like(base)
            for precision, roof in [("ieee", "gemm_fp32_ieee_tflops"), ("tf32x3", "gemm_tf32_tflops")]:
                t = time_ms(lambda: reconstruct(base, a, b, alpha=1.0, input_precision=precision, out=out), reps=reps)
                rec.add("reconstruct", "triton", shape, tasks, "fp32->bf16", precision, t, flops, moved, roof,
                        t0["ms"], rel_err(out, want))
            del base, a, b, want, out
            free()
    rec.write()
    return rec


if __name__ == "__main__":
    main()
