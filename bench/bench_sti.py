"""Benchmark: fused STI Σ|(G_U - I) diag(σ) (G_V - I)| vs the torch sequence (reference.sti_ref:
eye, two subtractions, a scaled copy, a batched GEMM writing the K×K product, abs, sum).

Grams [L, K, K] float64 with K = T·int(r/T) of each layer shape, L = 4. FLOPs 2K³ per layer.
Usage: python bench/bench_sti.py
"""
from __future__ import annotations

import torch

from _harness import DEV, LAYER_SHAPES, TASK_COUNTS, Recorder, free, kernel, rel_err, require_cuda, time_ms

LAYERS = 4


def main(roofs: dict | None = None) -> Recorder:
    require_cuda("bench_sti")
    sti = kernel("sti").sti
    from tsv_fast.reference import sti_ref

    rec = Recorder("sti", roofs)
    seen = set()
    for name, (m, n) in LAYER_SHAPES.items():
        for tasks in TASK_COUNTS:
            big_k = tasks * (min(m, n) // tasks)
            if big_k in seen:
                continue
            seen.add(big_k)
            eye = torch.eye(big_k, dtype=torch.float64, device=DEV)
            noise = torch.randn(2, LAYERS, big_k, big_k, dtype=torch.float64, device=DEV) * 1e-2
            gu, gv = eye + noise @ noise.mT
            sigma = torch.rand(LAYERS, big_k, dtype=torch.float64, device=DEV)
            flops = 2.0 * LAYERS * big_k ** 3
            shape = f"{name} K={big_k}"
            want = sti_ref(gu, sigma, gv)
            base = time_ms(lambda: sti_ref(gu, sigma, gv))
            rec.add("sti", "torch (sti_ref)", shape, tasks, "fp64", "fp64", base, flops, 2 * gu.numel() * 8,
                    "gemm_fp64_tflops")
            out = torch.empty(LAYERS, dtype=torch.float64, device=DEV)
            t = time_ms(lambda: sti(gu, sigma, gv, out=out))
            rec.add("sti", "triton", shape, tasks, "fp64", "fp64", t, flops, 2 * gu.numel() * 8, "gemm_fp64_tflops",
                    base["ms"], rel_err(out, want))
            del eye, noise, gu, gv, sigma
            free()
    rec.write()
    return rec


if __name__ == "__main__":
    main()
