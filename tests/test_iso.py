"""Iso-C and Iso-CTS (Marczak et al., ICML 2025) of the engine against their float64 twins, and the
twins against closed forms."""
import pytest
import torch

import tsv_fast
from tsv_fast import reference
from tsv_fast.synthetic import task_matrices
from tsv_fast.testing import FLOAT64_BOUND, assert_rel_close, contract_bound, rel_fro

F64 = torch.float64
SHAPES = [(37, 23), (23, 37), (48, 48), (1, 17), (64, 16)]
METHODS = {"iso-c": reference.iso_c, "iso-cts": reference.iso_cts}


def layer_task_vectors(shape, num_tasks, *, shared=0.3, kind="decay", seed=0, dtype=F64):
    deltas = task_matrices(shape, num_tasks, shared=shared, kind=kind, seed=seed, dtype=dtype)
    return [{"blocks.0.w": d, "blocks.0.b": torch.full((shape[0],), float(i), dtype=dtype)}
            for i, d in enumerate(deltas)]


def test_iso_cts_sizes_follow_the_authors_rule():
    # common = int(0.8 r), task-specific total rounded (half to even) to a multiple of T
    assert reference.iso_cts_split(768, 8) == (616, 19)          # 154/8 = 19.25 -> 19
    assert reference.iso_cts_split(768, 20) == (608, 8)          # 154/20 = 7.7 -> 8
    assert reference.iso_cts_split(10, 4) == (10, 0)             # 2/4 = 0.5 -> 0 (half to even)
    assert reference.iso_cts_split(20, 4, 0.7) == (12, 2)        # 6/4 = 1.5 -> 2
    assert reference.iso_cts_split(1024, 14) == (814, 15)
    for r in range(1, 60):
        for num_tasks in (1, 2, 3, 8, 20):
            for fraction in (0.0, 0.5, 0.8, 1.0):
                common, per_task = reference.iso_cts_split(r, num_tasks, fraction)
                assert common >= 0 and per_task >= 0 and common + num_tasks * per_task == r


def test_iso_c_closed_form():
    """Tasks whose sum has a known SVD: M = mean(σ) U Vᵀ over all r directions."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(40, 12, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=F64))[0]
    sigma = torch.linspace(3.0, 0.5, 12, dtype=F64)
    total = (u * sigma) @ v.mT
    tvs = [{"w": total / 4 + torch.randn(40, 12, generator=g, dtype=F64) * 1e-3 * (i - 1.5)} for i in range(4)]
    tvs[-1]["w"] = total - sum(tv["w"] for tv in tvs[:-1])  # the sum is exactly `total`
    want = sigma.mean() * (u @ v.mT)
    assert_rel_close("reference iso-c", reference.iso_c(tvs, compute_dtype=F64)["w"], want, 1e-12)
    assert_rel_close("engine iso-c", tsv_fast.merge(None, tvs, method="iso-c", compute_dtype=F64)["w"], want,
                     FLOAT64_BOUND)


def test_iso_cts_with_one_task_is_iso_c():
    """T = 1: the common subspace and the task's residual directions are all of Δ's singular vectors."""
    tvs = layer_task_vectors((50, 30), 1, seed=3)
    want = reference.iso_c(tvs, compute_dtype=F64)["blocks.0.w"]
    assert_rel_close("reference", reference.iso_cts(tvs, compute_dtype=F64)["blocks.0.w"], want, 1e-10)
    got = tsv_fast.merge(None, tvs, method="iso-cts", compute_dtype=F64)["blocks.0.w"]
    assert_rel_close("engine", got, want, FLOAT64_BOUND)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8])
def test_float64_parity_shapes(method, shape, num_tasks):
    tvs = layer_task_vectors(shape, num_tasks, seed=sum(shape) + num_tasks)
    got = tsv_fast.merge(None, tvs, method=method, compute_dtype=F64)
    want = METHODS[method](tvs, compute_dtype=F64)
    for key in want:
        assert got[key].dtype == F64
        assert_rel_close(f"{method} {key} {shape} T={num_tasks}", got[key], want[key], FLOAT64_BOUND)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["decay", "fast_decay", "clustered"])
@pytest.mark.parametrize("shared", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("num_tasks", [2, 8, 20])
def test_spectrum_classes(method, kind, shared, num_tasks):
    """Float64 mode within 1e-6 of the twin; float32 mode within the contract: 3x the error of the
    twin run in float32 (full float32 SVDs, the authors' numerics) against float64."""
    tvs64 = layer_task_vectors((96, 60), num_tasks, shared=shared, kind=kind, seed=num_tasks)
    want = METHODS[method](tvs64, compute_dtype=F64)["blocks.0.w"]
    got64 = tsv_fast.merge(None, tvs64, method=method, compute_dtype=F64)["blocks.0.w"]
    assert_rel_close("float64 mode", got64, want, FLOAT64_BOUND)
    tvs32 = [{k: v.float() for k, v in tv.items()} for tv in tvs64]
    authors = METHODS[method](tvs32)["blocks.0.w"]
    got32 = tsv_fast.merge(None, tvs32, method=method)["blocks.0.w"]
    assert got32.dtype == torch.float32
    assert_rel_close("float32 mode", got32, want, contract_bound(rel_fro(authors, want)))


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_and_identical_tasks(method):
    """Low-rank task vectors: the sum is rank-deficient; its zero directions are not filled with
    arbitrary vectors, so the merge is finite, of rank <= Σ ranks, and equals the twin."""
    low = task_matrices((30, 20), 3, rank=4, seed=5)
    for tvs in ([{"w": d} for d in low], [{"w": low[0]}, {"w": low[0].clone()}]):
        got = tsv_fast.merge(None, tvs, method=method, compute_dtype=F64)["w"]
        want = METHODS[method](tvs, compute_dtype=F64)["w"]
        assert_rel_close(f"{method} low rank T={len(tvs)}", got, want, FLOAT64_BOUND)
        assert int(torch.linalg.matrix_rank(got)) <= 4 * len(tvs)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("method", METHODS)
def test_streamed_in_task_batches_equals_all_at_once(method):
    """A budget too small for all T tasks of a layer: the engine reads the tasks in batches (Iso-CTS
    twice: once for the sum, once for the residuals) and must give the same merge."""
    pre = {"a.w": torch.randn(40, 30, dtype=F64), "b.w": torch.randn(40, 30, dtype=F64), "c": torch.randn(7, dtype=F64)}
    fts = [{k: v + 0.1 * torch.randn_like(v) for k, v in pre.items()} for _ in range(6)]
    per_matrix = 40 * 30 * 8 * 3
    batched = tsv_fast.merge(pre, fts, method=method, compute_dtype=F64, max_chunk_bytes=2 * per_matrix)
    whole = tsv_fast.merge(pre, fts, method=method, compute_dtype=F64)
    for key in whole:
        assert_rel_close(f"{method} {key}", batched[key], whole[key], 1e-12)


def test_alpha_weights_and_other_keys():
    """W = W_pre + α·M for every key; other keys get the mean task vector; a task weight scales Δ."""
    tvs = layer_task_vectors((20, 12), 3, seed=1)
    pre = {k: torch.randn_like(v) for k, v in tvs[0].items()}
    fts = [{k: pre[k] + tv[k] for k in pre} for tv in tvs]
    for method in METHODS:
        merged = tsv_fast.merge(pre, fts, method=method, alpha=0.6, compute_dtype=F64)
        m = METHODS[method](tvs, compute_dtype=F64)
        for key in pre:
            assert_rel_close(f"{method} {key}", merged[key], pre[key] + 0.6 * m[key], FLOAT64_BOUND)
    scaled = [{k: pre[k] + w * tv[k] for k in pre} for w, tv in zip((2.0, 1.0, 0.5), tvs)]
    got = tsv_fast.merge(pre, fts, method="iso-cts", weights=[2.0, 1.0, 0.5], compute_dtype=F64)
    want = tsv_fast.merge(pre, scaled, method="iso-cts", compute_dtype=F64)
    for key in pre:
        assert_rel_close(f"weights {key}", got[key], want[key], 1e-12)


def test_method_parameters_and_refusals():
    tvs = layer_task_vectors((40, 40), 4, seed=2)
    got = tsv_fast.merge(None, tvs, method="iso-cts", common_space_fraction=0.5, compute_dtype=F64)["blocks.0.w"]
    want = reference.iso_cts(tvs, common_space_fraction=0.5, compute_dtype=F64)["blocks.0.w"]
    assert_rel_close("fraction 0.5", got, want, FLOAT64_BOUND)
    assert rel_fro(got, reference.iso_cts(tvs, compute_dtype=F64)["blocks.0.w"]) > 1e-3  # the parameter matters
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['common_space_fraction'\] for method 'iso-c'"):
        tsv_fast.merge(None, tvs, method="iso-c", common_space_fraction=0.5)
    with pytest.raises(ValueError, match="does not use a per-task rank rule"):
        tsv_fast.merge(None, tvs, method="iso-c", rank_fraction=0.5)
    with pytest.raises(ValueError, match="unknown method"):
        tsv_fast.merge(None, tvs, method="ties")
    with pytest.raises(ValueError, match="common_space_fraction"):
        tsv_fast.merge(None, tvs, method="iso-cts", common_space_fraction=1.5)
