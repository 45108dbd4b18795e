"""tsv_fast.kernels.stack_gram against reference.stack_gram_ref (float64), CPU interpreter or GPU."""
# kernel_utils first: without CUDA it sets TRITON_INTERPRET=1 before anything imports triton.
from kernel_utils import (DEVICE, FLOOR, TF32X3_FACTOR, assert_close, assert_gaps_untouched, assert_unmodified,  # noqa: I001
                          bound_for, gpu, layout, load_kernel, poisoned, rel_fro, snapshot, sweep)

import pytest
import torch

from tsv_fast.reference import layer_factors_ref, polar_ref, stack_gram_ref
from tsv_fast.synthetic import task_matrices

stack_gram = load_kernel("stack_gram").stack_gram

# [L, m, K]: 1 x K, K > m (rank-deficient Gram), tall, two tile rows (K > 32 on the interpreter)
SHAPES = [(2, 1, 17), (1, 5, 9), (3, 37, 23), (2, 70, 41)]


def tsv_stack(m, n, num_tasks, shared, seed=0):
    """A real TSV stack U [m, T·k] (float64) of synthetic task matrices, ill-conditioned when shared."""
    deltas = task_matrices((m, n), num_tasks, shared=shared, seed=seed)
    u, _, _ = layer_factors_ref(list(deltas), min(m, n) // num_tasks)
    return u


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["contiguous", "strided", "transposed"])
def test_float64(shape, kind):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape)))
    xv = layout(x, kind)
    before = snapshot(xv)
    out, buf = poisoned((shape[0], shape[2], shape[2]), torch.float64, strided=kind == "strided")
    got = stack_gram(xv, out=out)
    assert_close(f"stack_gram fp64 {shape} {kind}", got, stack_gram_ref(x), FLOOR[torch.float64])
    assert_gaps_untouched("stack_gram", out, buf)
    assert_unmodified(before, [xv])
    assert torch.equal(got, got.mT)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_float32(shape, precision):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want = stack_gram_ref(x)
    torch_err = rel_fro(stack_gram_ref(x, out_dtype=torch.float32), want)
    out, _ = poisoned((shape[0], shape[2], shape[2]), torch.float32)
    got = stack_gram(x.to(DEVICE), input_precision=precision, out=out)
    assert got.dtype == torch.float32
    factor = TF32X3_FACTOR if precision == "tf32x3" else 2.0
    assert_close(f"stack_gram {precision} {shape}", got, want, bound_for(torch_err, torch.float32, factor),
                 torch_error=torch_err)
    # float32 stacks accumulated in float64 on request
    assert_close(f"stack_gram fp32->fp64 {shape}", stack_gram(x.to(DEVICE), out_dtype=torch.float64), want,
                 FLOOR[torch.float64])


@pytest.mark.parametrize("shared", [0.0, 0.9])
def test_tsv_stacks_and_their_polar_factors(shared):
    """Real stacks (κ up to ~1e3 at shared = 0.9) and U⊥, whose Gram is the identity on its range."""
    u = tsv_stack(48, 40, 4, shared)
    u3 = torch.stack([u, polar_ref(u)]).to(DEVICE)
    got = stack_gram(u3)
    assert_close(f"stack_gram tsv shared={shared}", got, stack_gram_ref(u3.cpu()), FLOOR[torch.float64])
    eye = torch.eye(u.shape[1], dtype=torch.float64)
    assert_close("stack_gram polar", got[1].cpu(), eye, 1e-12)


def test_two_dim_input_and_errors():
    x = torch.randn(9, 4, dtype=torch.float64)
    assert_close("stack_gram 2d", stack_gram(x.to(DEVICE)), stack_gram_ref(x), FLOOR[torch.float64])
    with pytest.raises(ValueError, match="tf32"):
        stack_gram(x.float().to(DEVICE), input_precision="tf32")
    with pytest.raises(ValueError):
        stack_gram(torch.zeros(2, 2, 3, 4, device=DEVICE))


@gpu
@pytest.mark.parametrize("m,big_k", [(3072, 768), (768, 768), (4096, 1024)])
def test_gpu_real_stack_shapes(m, big_k):
    """Stacks of ViT-B/32 and ViT-L/14 layers (T·k = r), L = 4, float64 and float32."""
    x = torch.randn(4, m, big_k, dtype=torch.float64, device="cuda") / m ** 0.5
    want = stack_gram_ref(x)
    assert_close(f"stack_gram gpu fp64 {m}x{big_k}", stack_gram(x), want, 1e-12)
    torch_err = rel_fro(stack_gram_ref(x.float(), out_dtype=torch.float32), want)
    for precision, factor in [("ieee", 2.0), ("tf32x3", TF32X3_FACTOR)]:
        got = stack_gram(x.float(), input_precision=precision)
        assert_close(f"stack_gram gpu {precision} {m}x{big_k}", got, want, bound_for(torch_err, torch.float32, factor),
                     torch_error=torch_err)


@sweep
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_for_a100_and_h100(arch):
    """Every autotune config of every mode compiles to cubin for sm80 / sm90 (no GPU needed)."""
    from kernel_utils import check_compiles

    check_compiles("stack_gram", arch)
