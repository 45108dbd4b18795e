"""tsv_fast.kernels.sti against reference.sti_ref (float64), CPU interpreter or GPU."""
# kernel_utils first: without CUDA it sets TRITON_INTERPRET=1 before anything imports triton.
from kernel_utils import (DEVICE, FLOOR, assert_close, assert_gaps_untouched, assert_unmodified, bound_for,  # noqa: I001
                          gpu, layout, load_kernel, poisoned, rel_fro, snapshot, sweep)

import pytest
import torch

from tsv_fast.reference import layer_factors_ref, polar_ref, sti_ref
from tsv_fast.synthetic import task_matrices

sti = load_kernel("sti").sti


def layer_grams(shape, num_tasks, layers, *, shared=0.5, seed=0):
    """G_U, σ, G_V ([L, K, K], [L, K], [L, K, K], float64) of real TSV stacks, K = T·k."""
    gus, sigmas, gvs = [], [], []
    for layer in range(layers):
        deltas = task_matrices(shape, num_tasks, shared=shared, seed=seed + layer)
        u, s, v = layer_factors_ref(list(deltas), max(1, min(shape) // num_tasks))
        gus.append(u.mT @ u)
        sigmas.append(s)
        gvs.append(v.mT @ v)
    return torch.stack(gus), torch.stack(sigmas), torch.stack(gvs)


# K = T·k: 1 (a single triplet), 17, 36, 70 (two and three tiles on the interpreter)
CASES = [((1, 5), 1, 1), ((40, 17), 1, 17), ((50, 36), 4, 36), ((80, 70), 2, 70)]


@pytest.mark.parametrize("shape,num_tasks,size", CASES)
@pytest.mark.parametrize("kind", ["contiguous", "strided"])
def test_float64(shape, num_tasks, size, kind):
    gu, s, gv = layer_grams(shape, num_tasks, layers=3, seed=size)
    assert gu.shape[-1] == size
    args = [layout(gu, kind), layout(s, kind), layout(gv, kind)]
    before = snapshot(*args)
    out, buf = poisoned((3,), torch.float64, strided=kind == "strided")
    got = sti(*args, out=out)
    # one task (K = k) has STI = 0 up to rounding: measure against the size of its terms, Σσ
    scale = float(s.sum())
    assert_close(f"sti fp64 K={size} {kind}", got, sti_ref(gu, s, gv), FLOOR[torch.float64], scale=scale)
    assert_gaps_untouched("sti", out, buf)
    assert_unmodified(before, args)


@pytest.mark.parametrize("shape,num_tasks,size", CASES[2:])  # T >= 2: STI is O(1), a relative error makes sense
def test_float32(shape, num_tasks, size):
    gu, s, gv = layer_grams(shape, num_tasks, layers=2, seed=7)
    want = sti_ref(gu, s, gv)
    torch_err = rel_fro(sti_ref(gu.float(), s.float(), gv.float()), want)
    got = sti(gu.float().to(DEVICE), s.float().to(DEVICE), gv.float().to(DEVICE))
    assert got.dtype == torch.float32
    assert_close(f"sti fp32 K={size}", got, want, bound_for(torch_err, torch.float32), torch_error=torch_err)


def test_orthogonal_stacks_have_zero_interference():
    """After TSV-M (U⊥, V⊥) the Grams are I and STI is 0; a single layer ([K, K]) gives a 0-dim result."""
    deltas = task_matrices((30, 24), 3, shared=0.5, seed=2)
    u, s, v = layer_factors_ref(list(deltas), 8)
    u, v = polar_ref(u), polar_ref(v)
    got = sti((u.mT @ u).to(DEVICE), s.to(DEVICE), (v.mT @ v).to(DEVICE))
    assert got.dim() == 0
    assert abs(float(got)) <= 1e-12 * float(s.sum()), f"sti of orthogonal stacks {float(got):.3e} != 0"


def test_shape_errors():
    g = torch.eye(4, dtype=torch.float64, device=DEVICE).expand(2, 4, 4)
    with pytest.raises(ValueError, match="sigma"):
        sti(g, torch.ones(2, 3, dtype=torch.float64, device=DEVICE), g)
    with pytest.raises(ValueError):
        sti(g, torch.ones(2, 4, dtype=torch.float64, device=DEVICE), g[:, :3, :3])


@gpu
@pytest.mark.parametrize("size", [768, 1024, 4096])
def test_gpu_real_sizes(size):
    """K = T·k = r of ViT-B/32, ViT-L/14 and LLaMA-7B layers, 4 layers, near-orthogonal stacks."""
    g = torch.randn(2, 4, size, size, dtype=torch.float64, device="cuda") * 1e-2
    gu, gv = torch.eye(size, dtype=torch.float64, device="cuda") + g @ g.mT
    s = torch.rand(4, size, dtype=torch.float64, device="cuda")
    assert_close(f"sti gpu K={size}", sti(gu, s, gv), sti_ref(gu, s, gv), 1e-12)


@sweep
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_for_a100_and_h100(arch):
    """Every autotune config of every mode compiles to cubin for sm80 / sm90 (no GPU needed)."""
    from kernel_utils import check_compiles

    check_compiles("sti", arch)
