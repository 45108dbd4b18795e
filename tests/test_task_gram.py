"""tsv_fast.kernels.task_gram against reference.task_gram_ref (float64), CPU interpreter or GPU."""
# kernel_utils first: without CUDA it sets TRITON_INTERPRET=1 before anything imports triton.
from kernel_utils import (DEVICE, FLOOR, TF32X3_FACTOR, assert_close, assert_gaps_untouched, assert_unmodified,  # noqa: I001
                          bound_for, gpu, layout, load_kernel, poisoned, real_shape_inputs, rel_fro, snapshot,
                          sweep)

import pytest
import torch

from tsv_fast.reference import task_gram_ref
from tsv_fast.synthetic import task_matrices

task_gram = load_kernel("task_gram").task_gram

SHAPES = [(1, 17), (17, 1), (37, 23), (23, 37), (64, 16), (41, 37)]
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(shape, num_tasks, dtype, seed):
    """Pretrained [m, n] and fine-tuned [T, m, n] with Δ of a prescribed spectrum, in ``dtype``."""
    deltas = task_matrices(shape, num_tasks, shared=0.5, kind="fast_decay", seed=seed)
    pre = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return pre.to(dtype), (pre + 0.1 * deltas).to(dtype)


def expected(ft, pre):
    """The exact Gram of the Δ the kernel sees (rounded inputs, difference in float64)."""
    return task_gram_ref(ft.cpu(), None if pre is None else pre.cpu(), out_dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_fp64_accumulation(shape, dtype):
    """The default mode: float64 Gram of bf16/fp16/fp32 weights, exact to float64 rounding."""
    pre, ft = make_inputs(shape, 3, dtype, seed=sum(shape))
    pre, ft = pre.to(DEVICE), ft.to(DEVICE)
    before = snapshot(ft, pre)
    side = min(shape)
    out, buf = poisoned((3, side, side), torch.float64)
    got = task_gram(ft, pre, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(f"task_gram fp64 {shape} {dtype}", got, expected(ft, pre), FLOOR[torch.float64])
    assert_unmodified(before, [ft, pre])


@pytest.mark.parametrize("shape", [(37, 23), (23, 37), (1, 17)])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_accumulation(shape, precision, dtype):
    """IEEE fp32 / 3xTF32 modes: at most FACTOR x the error of a torch float32 Gram."""
    pre, ft = make_inputs(shape, 2, dtype, seed=3)
    pre, ft = pre.to(DEVICE), ft.to(DEVICE)
    want = expected(ft, pre)
    torch_err = rel_fro(task_gram_ref(ft.cpu(), pre.cpu(), out_dtype=torch.float32), want)
    side = min(shape)
    out, _ = poisoned((2, side, side), torch.float32)
    got = task_gram(ft, pre, out_dtype=torch.float32, input_precision=precision, out=out)
    factor = TF32X3_FACTOR if precision == "tf32x3" else 2.0
    assert_close(f"task_gram {precision} {shape} {dtype}", got, want,
                 bound_for(torch_err, torch.float32, factor), torch_error=torch_err)


@pytest.mark.parametrize("kind", ["strided", "transposed"])
@pytest.mark.parametrize("shape", [(37, 23), (35, 41)])
def test_noncontiguous_inputs_and_strided_out(kind, shape):
    """Views are read through their strides; a strided output is written only where it points."""
    pre, ft = make_inputs(shape, 3, torch.float32, seed=5)
    ft_v, pre_v = layout(ft, kind), layout(pre, kind)
    side = min(shape)
    out, buf = poisoned((3, side, side), torch.float64, strided=True)
    got = task_gram(ft_v, pre_v, out=out)
    assert_close(f"task_gram {kind} {shape}", got, expected(ft, pre), FLOOR[torch.float64])
    assert_gaps_untouched("task_gram", out, buf)


def test_engine_layout_layers_by_tasks():
    """finetuned [L, T, m, n] with pretrained [L, m, n] (the engine's call) and with no pretrained."""
    layers, tasks, shape = 2, 3, (29, 13)
    pres, fts = zip(*(make_inputs(shape, tasks, torch.bfloat16, seed=s) for s in range(layers)))
    pre, ft = torch.stack(pres).to(DEVICE), torch.stack(fts).to(DEVICE)
    out, _ = poisoned((layers, tasks, 13, 13), torch.float64)
    got = task_gram(ft, pre, out=out)
    want = torch.stack([expected(ft[i], pre[i]) for i in range(layers)])
    assert_close("task_gram [L,T,m,n]", got, want, FLOOR[torch.float64])
    # The twin broadcasts torch-style: [L, 1, m, n] means the same thing.
    assert_close("task_gram [L,1,m,n]", task_gram(ft, pre.unsqueeze(1)), want, FLOOR[torch.float64])
    delta = (ft.double() - pre.double().unsqueeze(1)).to(DEVICE)
    assert_close("task_gram delta-only", task_gram(delta), want, FLOOR[torch.float64])


def test_gram_is_exactly_symmetric_and_eigenvalues_match_spectrum():
    """Mirrored tiles are bitwise symmetric; the eigenvalues are the prescribed σ² of Δ."""
    shape, tasks = (70, 45), 2  # two tile rows on the interpreter (32-wide tiles)
    deltas = task_matrices(shape, tasks, kind="decay", seed=11).to(DEVICE)
    got = task_gram(deltas)
    assert torch.equal(got, got.mT)
    want_sigma = torch.linalg.svdvals(deltas.cpu())
    eig = torch.linalg.eigvalsh(got.cpu()).flip(-1).clamp_min(0).sqrt()
    assert_close("task_gram spectrum", eig, want_sigma, 1e-12)


def test_rejects_plain_tf32_and_bad_shapes():
    ft = torch.zeros(2, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="tf32"):
        task_gram(ft, out_dtype=torch.float32, input_precision="tf32")
    with pytest.raises(ValueError, match="does not match"):
        task_gram(ft, torch.zeros(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        task_gram(ft, out=torch.empty(2, 4, 4, dtype=torch.float64, device=DEVICE))


def test_old_triton_takes_16bit_inputs_through_a_float32_copy(monkeypatch):
    """Triton < 3.9 cannot compile an fp64 dot of 16-bit loads: the launcher upcasts to float32
    first (exact), so the result is the same float64 Gram."""
    common = load_kernel("_common")
    monkeypatch.setattr(common, "TRITON_VERSION", (3, 6))
    pre, ft = make_inputs((37, 23), 2, torch.bfloat16, seed=8)
    pre, ft = pre.to(DEVICE), ft.to(DEVICE)
    assert common.fp64_operand(ft).dtype == torch.float32 and common.fp64_operand(pre.double()).dtype == torch.float64
    before = snapshot(ft, pre)
    assert_close("task_gram fp64 via fp32 copy", task_gram(ft, pre), expected(ft, pre), FLOOR[torch.float64])
    assert_unmodified(before, [ft, pre])
    monkeypatch.setattr(common, "TRITON_VERSION", (3, 9))
    assert common.fp64_operand(ft) is ft


def test_autotune_switch_keeps_only_the_first_config(monkeypatch):
    """TSV_FAST_TRITON_AUTOTUNE=0 (cold-cache GPU checks): one config per list, nothing to tune."""
    common = load_kernel("_common")
    module = load_kernel("task_gram")
    key = ("rows", "cols")
    monkeypatch.delenv("TSV_FAST_TRITON_AUTOTUNE", raising=False)
    full = common.autotuned(module._gram_kernel, module._gram_configs, key, 9, "fp64")
    monkeypatch.setenv("TSV_FAST_TRITON_AUTOTUNE", "0")
    first = common.autotuned(module._gram_kernel, module._gram_configs, key, 9, "fp64")
    assert len(full.configs) == len(module._gram_configs(9, "fp64")) > 1
    assert [c.kwargs for c in first.configs] == [module._gram_configs(9, "fp64")[0].kwargs]


def test_out_overlapping_the_inputs_is_refused():
    pre, ft = make_inputs((23, 23), 2, torch.float64, seed=9)
    ft = ft.to(DEVICE)
    with pytest.raises(ValueError, match="out overlaps finetuned in memory"):
        task_gram(ft, out=ft)


@gpu
@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072), (4096, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_real_layer_shapes(shape, dtype):
    """T = 8 at ViT-B/32 and ViT-L/14 shapes: fp64 mode and IEEE fp32 mode against the float64 twin."""
    pre, ft = real_shape_inputs(shape, 8, dtype)
    want = task_gram_ref(ft, pre, out_dtype=torch.float64)
    assert_close(f"task_gram gpu fp64 {shape} {dtype}", task_gram(ft, pre), want, 1e-12)
    torch_err = rel_fro(task_gram_ref(ft, pre, out_dtype=torch.float32), want)
    for precision, factor in [("ieee", 2.0), ("tf32x3", TF32X3_FACTOR)]:
        got = task_gram(ft, pre, out_dtype=torch.float32, input_precision=precision)
        assert_close(f"task_gram gpu {precision} {shape} {dtype}", got, want,
                     bound_for(torch_err, torch.float32, factor), torch_error=torch_err)


@sweep
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_for_a100_and_h100(arch):
    """Every autotune config of every mode compiles to cubin for sm80 / sm90 (no GPU needed)."""
    from kernel_utils import check_compiles

    check_compiles("task_gram", arch)
