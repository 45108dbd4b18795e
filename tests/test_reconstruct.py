"""tsv_fast.kernels.reconstruct against reference.reconstruct_ref (float64), and the whole merge
through ``backend="triton"`` against the float64 reference (DESIGN.md §2 accuracy contract)."""
# kernel_utils first: without CUDA it sets TRITON_INTERPRET=1 before anything imports triton.
from kernel_utils import (DEVICE, FLOOR, HAS_CUDA, TF32X3_FACTOR, assert_close, assert_gaps_untouched,  # noqa: I001
                          assert_unmodified, bound_for, gpu, layout, load_kernel, poisoned, rel_fro, snapshot,
                          sweep)

import pytest
import torch

import tsv_fast
from tsv_fast import reference
from tsv_fast.reference import reconstruct_ref
from tsv_fast.synthetic import task_matrices

reconstruct = load_kernel("reconstruct").reconstruct

# (m, n, K): 1 x N, N x 1, tall, wide, K = 1, several tiles in every direction
SHAPES = [(1, 17, 3), (17, 1, 4), (37, 23, 11), (23, 37, 1), (70, 45, 40)]


def make(m, n, big_k, layers=2, dtype=torch.float32, base_dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(layers, m, big_k, generator=g, dtype=torch.float64)
    b = torch.randn(layers, n, big_k, generator=g, dtype=torch.float64) / big_k ** 0.5
    base = None if base_dtype is None else torch.randn(layers, m, n, generator=g).to(base_dtype)
    return base, a.to(dtype), b.to(dtype)


def exact(base, a, b, alpha):
    """The float64 result before any output rounding."""
    return reconstruct_ref(None if base is None else base.double().cpu(), a.double().cpu(), b.double().cpu(),
                           alpha=alpha, out_dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("base_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                  (torch.float32, torch.float32), (None, torch.float32)])
def test_float32_gemm_all_output_dtypes(shape, base_dtype, out_dtype):
    base, a, b = make(*shape, base_dtype=base_dtype, seed=sum(shape))
    alpha = 0.37
    want = exact(base, a, b, alpha)
    torch_err = rel_fro(reconstruct_ref(base, a, b, alpha=alpha, out_dtype=out_dtype), want)
    args = [None if base is None else base.to(DEVICE), a.to(DEVICE), b.to(DEVICE)]
    before = snapshot(*args)
    out, _ = poisoned(want.shape, out_dtype)
    got = reconstruct(*args, alpha=alpha, out_dtype=out_dtype, out=out)
    assert got.dtype == out_dtype and got.data_ptr() == out.data_ptr()
    assert_close(f"reconstruct fp32->{out_dtype} {shape}", got, want, bound_for(torch_err, out_dtype),
                 torch_error=torch_err)
    assert_unmodified(before, args)


@pytest.mark.parametrize("shape", [(37, 23, 11), (70, 45, 40)])
@pytest.mark.parametrize("kind", ["strided", "transposed"])
def test_noncontiguous_and_strided_out(shape, kind):
    base, a, b = make(*shape, base_dtype=torch.float16, seed=1)
    want = exact(base, a, b, 1.0)
    torch_err = rel_fro(reconstruct_ref(base, a, b, out_dtype=torch.float32), want)
    out, buf = poisoned(want.shape, torch.float32, strided=True)
    got = reconstruct(layout(base, kind), layout(a, kind), layout(b, kind), out_dtype=torch.float32, out=out)
    assert_close(f"reconstruct {kind} {shape}", got, want, bound_for(torch_err, torch.float32), torch_error=torch_err)
    assert_gaps_untouched("reconstruct", out, buf)


@pytest.mark.parametrize("shape", [(37, 23, 11), (70, 45, 40)])
def test_float64_gemm_and_alpha_kept_in_float64(shape):
    """float64 A, B: fp64 accumulation and an fp64 α (0.1 is not an fp32 number)."""
    base, a, b = make(*shape, dtype=torch.float64, base_dtype=torch.float64, seed=2)
    out, _ = poisoned((2, shape[0], shape[1]), torch.float64)
    got = reconstruct(base.to(DEVICE), a.to(DEVICE), b.to(DEVICE), alpha=0.1, out=out)
    assert_close(f"reconstruct fp64 {shape}", got, exact(base, a, b, 0.1), FLOOR[torch.float64])


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_two_dim_and_precision_modes(precision):
    base, a, b = make(37, 41, 36, layers=1, base_dtype=torch.float32, seed=3)
    base, a, b = base[0], a[0], b[0]
    want = exact(base, a, b, 2.0)
    torch_err = rel_fro(reconstruct_ref(base, a, b, alpha=2.0), want)
    got = reconstruct(base.to(DEVICE), a.to(DEVICE), b.to(DEVICE), alpha=2.0, input_precision=precision)
    factor = TF32X3_FACTOR if precision == "tf32x3" else 2.0
    assert_close(f"reconstruct {precision} 2d", got, want, bound_for(torch_err, torch.float32, factor),
                 torch_error=torch_err)
    with pytest.raises(ValueError, match="tf32"):
        reconstruct(base.to(DEVICE), a.to(DEVICE), b.to(DEVICE), input_precision="tf32")


def test_out_overlapping_an_input_is_refused():
    """In place (out = base) would add α·ABᵀ once per autotune config tried: refused for every input."""
    base, a, b = make(37, 23, 11, base_dtype=torch.float32, seed=4)
    base, a, b = base.to(DEVICE), a.to(DEVICE), b.to(DEVICE)
    before = snapshot(base)
    for name, out in [("base", base), ("base", base[:, 1:, :]), ("a", a[..., :1].expand(2, 37, 23))]:
        with pytest.raises(ValueError, match=f"out overlaps {name} in memory"):
            reconstruct(base, a, b, out=out)
    assert_unmodified(before, [base])


def test_disjoint_halves_of_one_buffer_are_fine():
    """out and base may share a storage when their byte ranges are disjoint (interleaved views are
    refused: the check compares address ranges)."""
    base, a, b = make(37, 23, 11, base_dtype=torch.float32, seed=5)
    buf = torch.full((4, 37, 23), float("nan"), device=DEVICE)
    buf[2:] = base.to(DEVICE)
    got = reconstruct(buf[2:], a.to(DEVICE), b.to(DEVICE), out=buf[:2])
    want = exact(base, a, b, 1.0)
    torch_err = rel_fro(reconstruct_ref(base, a, b, out_dtype=torch.float32), want)
    assert_close("reconstruct into the half beside base", got, want, bound_for(torch_err, torch.float32),
                 torch_error=torch_err)
    with pytest.raises(ValueError, match="out overlaps base"):  # one matrix of overlap
        reconstruct(buf[2:], a.to(DEVICE), b.to(DEVICE), out=buf[1:3])


# ------------------------------------------------------------------------------------------------
# The whole merge through the Triton backend
# ------------------------------------------------------------------------------------------------
def checkpoints(shape, num_tasks, *, shared, kind, dtype, seed=0):
    deltas = task_matrices(shape, num_tasks, shared=shared, kind=kind, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pre = {"blocks.0.w": torch.randn(shape, generator=g, dtype=torch.float64),
           "blocks.0.b": torch.randn(shape[0], generator=g, dtype=torch.float64)}
    fts = [{"blocks.0.w": pre["blocks.0.w"] + 0.05 * deltas[i], "blocks.0.b": pre["blocks.0.b"] + 0.01 * i}
           for i in range(num_tasks)]
    cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}  # noqa: E731
    return cast(pre), [cast(ft) for ft in fts]


@pytest.mark.parametrize("shape,num_tasks,shared,kind", [((37, 23), 3, 0.5, "decay"), ((23, 41), 4, 0.9, "clustered"),
                                                         ((40, 40), 8, 0.0, "fast_decay")])
def test_tsv_merge_triton_backend_meets_accuracy_contract(shape, num_tasks, shared, kind):
    """rel_F(M_triton, M_fp64) <= max(1e-5, 3 x rel_F(M_authors_fp32, M_fp64)) on float32 checkpoints."""
    pre, fts = checkpoints(shape, num_tasks, shared=shared, kind=kind, dtype=torch.float32)
    pre64 = {k: v.double() for k, v in pre.items()}
    fts64 = [{k: v.double() for k, v in ft.items()} for ft in fts]
    want = reference.tsv_merge(pre64, fts64, compute_dtype=torch.float64)
    dev = lambda sd: {k: v.to(DEVICE) for k, v in sd.items()}  # noqa: E731
    got, report = tsv_fast.tsv_merge(dev(pre), [dev(ft) for ft in fts], backend="triton", return_report=True)
    assert report.backend == "triton"
    authors = reference.authors_fast_tsv_merge([{k: ft[k] - pre[k] for k in pre} for ft in fts])
    key = "blocks.0.w"
    m_want = want[key] - pre64[key]
    authors_err = rel_fro(authors[key], m_want)
    bound = max(1e-5, 3 * authors_err)
    assert got[key].dtype == torch.float32
    assert_close(f"merge M {shape} T={num_tasks}", got[key].double().cpu() - pre64[key], m_want, bound,
                 torch_error=authors_err)
    assert_close("merge bias", got["blocks.0.b"].cpu(), want["blocks.0.b"].float(), 1e-6)


def test_tsv_merge_triton_backend_float64_and_bf16():
    """compute_dtype=float64 matches the reference to 1e-10; bf16 checkpoints come back in bf16."""
    pre, fts = checkpoints((31, 29), 3, shared=0.3, kind="decay", dtype=torch.float64, seed=4)
    want = reference.tsv_merge(pre, fts, compute_dtype=torch.float64)
    dev = lambda sd: {k: v.to(DEVICE) for k, v in sd.items()}  # noqa: E731
    got = tsv_fast.tsv_merge(dev(pre), [dev(ft) for ft in fts], backend="triton", compute_dtype=torch.float64)
    w_pre = pre["blocks.0.w"]
    assert_close("merge fp64", got["blocks.0.w"].cpu() - w_pre, want["blocks.0.w"] - w_pre, 1e-10)
    pre16 = {k: v.bfloat16() for k, v in pre.items()}
    fts16 = [{k: v.bfloat16() for k, v in ft.items()} for ft in fts]
    got16 = tsv_fast.tsv_merge(dev(pre16), [dev(ft) for ft in fts16], backend="triton")
    want16 = reference.tsv_merge(pre16, fts16, compute_dtype=torch.float64)
    assert got16["blocks.0.w"].dtype == torch.bfloat16
    # both round the same merged weights to bf16: at most one bf16 ulp apart
    assert_close("merge bf16", got16["blocks.0.w"].cpu(), want16["blocks.0.w"], FLOOR[torch.bfloat16])


def test_kernel_package_and_backend_import_light():
    """``import tsv_fast.kernels`` and the backend module import neither triton nor the kernels."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "from tsv_fast.backends.triton import TritonBackend, kernels_package\n"
            "package = kernels_package()\n"
            "assert package.__all__ == ['task_gram', 'stack_gram', 'sti', 'reconstruct'], package.__all__\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert not [m for m in sys.modules if m.startswith('tsv_fast.kernels.')], 'kernel module imported'\n")
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_backend_unavailable_reasons():
    from tsv_fast.backends import unavailable_reasons

    if DEVICE.type == "cpu":
        assert unavailable_reasons("triton", "cpu") == []
    reasons = unavailable_reasons("triton", "meta")
    assert reasons and "not supported" in reasons[0]
    if not HAS_CUDA:
        assert any("CUDA" in r or "cuda" in r for r in unavailable_reasons("triton", "cuda"))


@gpu
@pytest.mark.parametrize("m,n", [(3072, 768), (768, 3072), (4096, 1024)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gpu_real_layer_shapes(m, n, out_dtype):
    """K = r (T·k at T = 8), L = 2; fp32 IEEE and 3xTF32 against the float64 result."""
    big_k = min(m, n)
    base = torch.randn(2, m, n, device="cuda").to(out_dtype)
    a = torch.randn(2, m, big_k, device="cuda") * 1e-2
    b = torch.linalg.qr(torch.randn(2, n, big_k, device="cuda", dtype=torch.float64))[0].float()
    want = exact(base, a, b, 1.0)
    torch_err = rel_fro(reconstruct_ref(base, a, b, out_dtype=out_dtype), want)
    for precision, factor in [("ieee", 2.0), ("tf32x3", TF32X3_FACTOR)]:
        got = reconstruct(base, a, b, out_dtype=out_dtype, input_precision=precision)
        assert_close(f"reconstruct gpu {precision} {m}x{n}", got, want, bound_for(torch_err, out_dtype, factor),
                     torch_error=torch_err)


@gpu
@pytest.mark.parametrize("shape,dtype", [((1536, 384), torch.float32), ((384, 1536), torch.bfloat16)])
def test_gpu_merge_through_triton_backend_at_layer_scale(shape, dtype):
    """The whole merge on CUDA with backend="triton", T = 8: the accuracy contract against the
    float64 reference (bf16 checkpoints: one bf16 ulp of the merged weights)."""
    pre, fts = checkpoints(shape, 8, shared=0.5, kind="decay", dtype=dtype, seed=6)
    pre64 = {k: v.double() for k, v in pre.items()}
    fts64 = [{k: v.double() for k, v in ft.items()} for ft in fts]
    want = reference.tsv_merge(pre64, fts64, compute_dtype=torch.float64)
    cuda = lambda sd: {k: v.cuda() for k, v in sd.items()}  # noqa: E731
    got, report = tsv_fast.tsv_merge(cuda(pre), [cuda(ft) for ft in fts], backend="triton", return_report=True)
    assert report.backend == "triton" and got["blocks.0.w"].dtype == dtype
    key = "blocks.0.w"
    if dtype == torch.bfloat16:
        assert_close("gpu merge bf16", got[key].cpu(), want[key].to(dtype), FLOOR[torch.bfloat16])
        return
    authors = reference.authors_fast_tsv_merge([{k: ft[k] - pre[k] for k in pre} for ft in fts])
    m_want = want[key] - pre64[key]
    authors_err = rel_fro(authors[key], m_want)
    assert_close(f"gpu merge M {shape}", got[key].double().cpu() - pre64[key], m_want, max(1e-5, 3 * authors_err),
                 torch_error=authors_err)


@sweep
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_for_a100_and_h100(arch):
    """Every autotune config of every mode compiles to cubin for sm80 / sm90 (no GPU needed)."""
    from kernel_utils import check_compiles

    check_compiles("reconstruct", arch)


def test_backend_kernels_compile_for_h100():
    """What the Triton backend launches on an H100 compiles for sm90 (one process, first configs):
    the fp64 task Gram of bf16 weights and the fp64 stack Gram and STI (fp64 tensor-core MMA), and
    the fp32 reconstruction in IEEE (FMA) and 3xTF32 (wgmma) modes."""
    from kernel_utils import assert_compiled, compile_for_gpu, compile_jobs

    mma_jobs = (compile_jobs("task_gram", 90, ["fp64"], first_only=True)
                + compile_jobs("stack_gram", 90, ["fp64"], first_only=True)
                + compile_jobs("sti", 90, ["fp64"], sizes=(4096,), first_only=True)
                + compile_jobs("reconstruct", 90, ["tf32x3"], first_only=True))
    fma_jobs = compile_jobs("reconstruct", 90, ["ieee"], first_only=True)
    results = compile_for_gpu(mma_jobs + fma_jobs)
    assert_compiled(mma_jobs, results[:len(mma_jobs)], tensor_core=True)
    assert_compiled(fma_jobs, results[len(mma_jobs):], tensor_core=False)
    assert results[len(mma_jobs) - 1]["wgmma"] > 0, "3xTF32 reconstruction does not use wgmma on sm90"
