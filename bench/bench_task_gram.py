"""Benchmark: fused task Gram (Δ formed in-kernel) vs the torch sequence it replaces.

torch (what TorchBackend does): Δ = ft.double() - pre.double() written to memory, then a cuBLAS
DGEMM ΔᵀΔ. Triton: one kernel reading the bf16 checkpoints, upper-triangular tiles only, in fp64,
IEEE fp32 and 3xTF32 modes (the fp32 modes are compared with torch's IEEE fp32 Gram too).
"cuBLAS GEMM of its size": the batched DGEMM / SGEMM ΔᵀΔ alone, Δ already formed in the GEMM's
dtype (the goal: the fused kernel within 1.3x of it, column over_gemm).
TFLOP/s count the full GEMM (2·max(m,n)·min(m,n)² per task) for every provider, so the triangular
saving shows up as a higher figure. Usage: python bench/bench_task_gram.py
"""
from __future__ import annotations

import torch

from _harness import DEV, LAYER_SHAPES, TASK_COUNTS, Recorder, free, kernel, rel_err, require_cuda, time_ms


def torch_gram(ft: torch.Tensor, pre: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    delta = ft.to(dtype) - pre.to(dtype)
    return delta.mT @ delta if delta.shape[-2] >= delta.shape[-1] else delta @ delta.mT


def main(roofs: dict | None = None) -> Recorder:
    require_cuda("bench_task_gram")
    task_gram = kernel("task_gram").task_gram
    rec = Recorder("task_gram", roofs)
    for name, (m, n) in LAYER_SHAPES.items():
        for tasks in TASK_COUNTS:
            pre = (torch.randn(m, n, device=DEV) * 0.02).bfloat16()
            ft = (pre.float() + torch.randn(tasks, m, n, device=DEV) * 1e-3).bfloat16()
            side = min(m, n)
            flops = 2.0 * tasks * max(m, n) * side * side
            read = (tasks + 1) * m * n * 2
            reps = 5 if flops > 1e12 else 15
            shape = f"{name} {m}x{n}"
            want = torch_gram(ft, pre, torch.float64)
            gemm = {}
            for dtype, label in [(torch.float64, "DGEMM"), (torch.float32, "SGEMM")]:
                delta = ft.to(dtype) - pre.to(dtype)
                if delta.shape[-2] < delta.shape[-1]:
                    delta = delta.mT.contiguous()
                gemm[dtype] = time_ms(lambda: delta.mT @ delta, reps=reps)
                rec.add("task_gram", f"cuBLAS {label} of its size (Δ given)", shape, tasks, str(dtype)[6:],
                        "fp64" if dtype == torch.float64 else "ieee", gemm[dtype], flops,
                        delta.numel() * delta.element_size() + tasks * side * side * delta.element_size(),
                        "gemm_fp64_tflops" if dtype == torch.float64 else "gemm_fp32_ieee_tflops")
                del delta
            base = time_ms(lambda: torch_gram(ft, pre, torch.float64), reps=reps)
            rec.add("task_gram", "torch fp64 Δ + DGEMM", shape, tasks, "bf16", "fp64", base, flops,
                    read + tasks * side * side * 8, "gemm_fp64_tflops", gemm_ms=gemm[torch.float64]["ms"])
            out64 = torch.empty_like(want)
            t = time_ms(lambda: task_gram(ft, pre, out=out64), reps=reps)
            rec.add("task_gram", "triton", shape, tasks, "bf16", "fp64", t, flops, read + out64.numel() * 8,
                    "gemm_fp64_tflops", base["ms"], rel_err(out64, want), gemm_ms=gemm[torch.float64]["ms"])
            base32 = time_ms(lambda: torch_gram(ft, pre, torch.float32), reps=reps)
            rec.add("task_gram", "torch fp32 Δ + SGEMM", shape, tasks, "bf16", "ieee", base32, flops,
                    read + tasks * side * side * 4, "gemm_fp32_ieee_tflops", max_rel_err=rel_err(
                        torch_gram(ft, pre, torch.float32), want), gemm_ms=gemm[torch.float32]["ms"])
            out32 = torch.empty(want.shape, dtype=torch.float32, device=DEV)
            for precision, roof in [("ieee", "gemm_fp32_ieee_tflops"), ("tf32x3", "gemm_tf32_tflops")]:
                t = time_ms(lambda: task_gram(ft, pre, out_dtype=torch.float32, input_precision=precision,
                                              out=out32), reps=reps)
                rec.add("task_gram", "triton", shape, tasks, "bf16", precision, t, flops,
                        read + out32.numel() * 4, roof, base32["ms"], rel_err(out32, want),
                        gemm_ms=gemm[torch.float32]["ms"])
            del pre, ft, want, out64, out32
            free()
    rec.write()
    return rec


if __name__ == "__main__":
    main()
