"""TSV-M of the fast route (fast_tsv_merge, tsv_merge) against the float64 reference."""
import pytest
import torch

import tsv_fast
from tsv_fast import reference
from tsv_fast.synthetic import task_matrices
from tsv_fast.testing import FLOAT64_BOUND, assert_rel_close, contract_bound, rel_fro

SHAPES = [(37, 23), (23, 37), (48, 48), (31, 29), (1, 17), (17, 1), (64, 16)]


def layer_task_vectors(shape, num_tasks, *, shared=0.3, kind="decay", seed=0, dtype=torch.float64):
    deltas = task_matrices(shape, num_tasks, shared=shared, kind=kind, seed=seed, dtype=dtype)
    return [{"blocks.0.w": d, "blocks.0.b": torch.full((shape[0],), float(i), dtype=dtype)}
            for i, d in enumerate(deltas)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8])
def test_float64_parity_shapes(shape, num_tasks):
    tvs = layer_task_vectors(shape, num_tasks, seed=sum(shape) + num_tasks)
    got = tsv_fast.fast_tsv_merge(tvs, compute_dtype=torch.float64, min_rank=1)
    want = reference.fast_tsv_merge(tvs, compute_dtype=torch.float64, min_rank=1)
    for key in want:
        assert got[key].dtype == torch.float64
        assert_rel_close(f"{key} {shape} T={num_tasks}", got[key], want[key], FLOAT64_BOUND)


@pytest.mark.parametrize("kind", ["decay", "fast_decay", "clustered"])  # a flat spectrum has no defined top-k
@pytest.mark.parametrize("shared", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("num_tasks", [2, 8, 20])
def test_spectrum_classes(kind, shared, num_tasks):
    """Float64 mode within 1e-6; float32 mode within the contract (3x the authors' float32 error)."""
    tvs64 = layer_task_vectors((96, 60), num_tasks, shared=shared, kind=kind, seed=num_tasks)
    want = reference.fast_tsv_merge(tvs64, compute_dtype=torch.float64)["blocks.0.w"]
    got64 = tsv_fast.fast_tsv_merge(tvs64, compute_dtype=torch.float64)["blocks.0.w"]
    assert_rel_close("float64 mode", got64, want, FLOAT64_BOUND)

    tvs32 = [{k: v.float() for k, v in tv.items()} for tv in tvs64]
    authors = reference.authors_fast_tsv_merge(tvs32)["blocks.0.w"]
    got32 = tsv_fast.fast_tsv_merge(tvs32)["blocks.0.w"]
    assert got32.dtype == torch.float32
    assert_rel_close("float32 mode", got32, want, contract_bound(rel_fro(authors, want)))


def test_compact_route_equals_zero_padded_authors_route():
    """DESIGN.md §2: with full-rank stacks the compact m×Tk form gives the padded route's M."""
    for shape, num_tasks in [((50, 40), 4), ((40, 50), 3), ((33, 33), 5)]:
        tvs = layer_task_vectors(shape, num_tasks, shared=0.5, seed=7)
        padded = reference.authors_fast_tsv_merge(tvs, compute_dtype=torch.float64)
        compact = reference.fast_tsv_merge(tvs, compute_dtype=torch.float64)
        fast = tsv_fast.fast_tsv_merge(tvs, compute_dtype=torch.float64)
        for key in padded:
            assert_rel_close(f"reference {key}", compact[key], padded[key], 1e-10)
            assert_rel_close(f"fast {key}", fast[key], padded[key], FLOAT64_BOUND)


@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32])
def test_exact_route_is_the_reference(compute_dtype):
    """exact=True: full SVDs and SVD Procrustes in the compute dtype, equal to the reference at that
    dtype, on every shape class and on rank-deficient and identical tasks."""
    cases = [layer_task_vectors(shape, num_tasks, seed=sum(shape), dtype=compute_dtype)
             for shape in [(37, 23), (23, 37), (1, 17), (64, 16)] for num_tasks in (1, 3, 8)]
    low_rank = task_matrices((30, 20), 3, rank=4, seed=5, dtype=compute_dtype)
    cases.append([{"w": d} for d in low_rank])
    cases.append([{"w": low_rank[0]}, {"w": low_rank[0].clone()}])  # identical fine-tunes merge to that task
    for tvs in cases:
        got, report = tsv_fast.fast_tsv_merge(tvs, compute_dtype=compute_dtype, min_rank=1, exact=True,
                                              return_report=True)
        want = reference.fast_tsv_merge(tvs, compute_dtype=compute_dtype, min_rank=1)
        oracle = reference.fast_tsv_merge(tvs, compute_dtype=torch.float64, min_rank=1)
        assert report.backend == "exact"
        for key in want:
            assert got[key].dtype == compute_dtype
            # two runs of the same float32 algorithm (batched vs one matrix at a time) differ by up
            # to their own rounding error, amplified by the conditioning of the stacks: bound by it
            bound = 1e-12 if compute_dtype == torch.float64 else max(1e-6, 3 * rel_fro(want[key], oracle[key]))
            assert_rel_close(f"exact {key} {tuple(want[key].shape)} T={len(tvs)}", got[key], want[key], bound)
    bound = 1e-12 if compute_dtype == torch.float64 else 1e-6
    assert_rel_close("identical tasks", got["w"], low_rank[0], 100 * bound)


def test_exact_route_matches_the_authors_and_the_fast_route():
    """On full-rank stacks exact=True is the published algorithm (float32 numerics and all), and the
    default route stays within the accuracy contract of it."""
    tvs64 = layer_task_vectors((96, 60), 8, shared=0.5, seed=21)
    tvs32 = [{k: v.float() for k, v in tv.items()} for tv in tvs64]
    want = reference.fast_tsv_merge(tvs64, compute_dtype=torch.float64)["blocks.0.w"]
    authors = reference.authors_fast_tsv_merge(tvs32)["blocks.0.w"]
    exact = tsv_fast.fast_tsv_merge(tvs32, exact=True)["blocks.0.w"]
    fast = tsv_fast.fast_tsv_merge(tvs32)["blocks.0.w"]
    assert_rel_close("exact vs authors", exact, authors, 1e-5)
    assert rel_fro(exact, want) <= contract_bound(rel_fro(authors, want))
    assert_rel_close("fast route", fast, want, contract_bound(rel_fro(authors, want)))


def test_exact_route_streams_task_batches_and_rejects_other_backends():
    from tsv_fast import Options, tsv_merge
    from tsv_fast.io.checkpoint import DictCheckpoint

    pre = {"w": torch.randn(40, 30, dtype=torch.float64), "b": torch.zeros(30, dtype=torch.float64)}
    deltas = task_matrices((40, 30), 6, shared=0.4, seed=12)
    fts = [{"w": pre["w"] + d, "b": pre["b"] + i} for i, d in enumerate(deltas)]
    options = Options(compute_dtype=torch.float64, max_chunk_bytes=2 * 40 * 30 * 8 * 3, exact=True, alpha=0.7)
    merged, report = tsv_merge(DictCheckpoint(pre), [DictCheckpoint(ft) for ft in fts], options=options,
                               return_report=True)
    want = reference.tsv_merge(pre, fts, alpha=0.7, compute_dtype=torch.float64)
    assert report.backend == "exact"
    for key in want:
        assert_rel_close(f"task-batched exact {key}", merged[key], want[key], 1e-12)
    with pytest.raises(ValueError, match="exact=True .* backend='triton'"):
        tsv_fast.tsv_merge(pre, fts, exact=True, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tsv_merge_weights_alpha_and_dtypes(dtype):
    generator = torch.Generator().manual_seed(3)
    pre = {"enc.0.w": torch.randn(40, 24, generator=generator).to(dtype),
           "enc.0.b": torch.randn(24, generator=generator).to(dtype),
           "enc.conv": torch.randn(4, 3, 2, 2, generator=generator).to(dtype)}
    deltas = task_matrices((40, 24), 4, shared=0.4, seed=5)
    fts = [{"enc.0.w": (pre["enc.0.w"].double() + d).to(dtype),
            "enc.0.b": (pre["enc.0.b"].double() + 0.1 * i).to(dtype),
            "enc.conv": (pre["enc.conv"].double() + 0.01 * i).to(dtype)} for i, d in enumerate(deltas)]
    for alpha in (1.0, 0.4):
        got = tsv_fast.tsv_merge(pre, fts, alpha=alpha)
        want = reference.tsv_merge({k: v.double() for k, v in pre.items()},
                                   [{k: v.double() for k, v in ft.items()} for ft in fts],
                                   alpha=alpha, compute_dtype=torch.float64)
        for key in pre:
            assert got[key].dtype == dtype
            bound = 1e-5 if dtype == torch.float32 else 1e-2  # the output cast dominates
            assert_rel_close(f"{key} alpha={alpha}", got[key], want[key], bound)


def test_tsv_merge_accepts_modules_and_never_modifies_inputs():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 6))
    tuned = []
    for i in range(3):
        model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 6))
        model.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        tuned.append(model)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in [base, *tuned]]
    got = tsv_fast.tsv_merge(base, tuned)
    want = reference.tsv_merge(base.state_dict(), [m.state_dict() for m in tuned])
    for key in want:
        assert_rel_close(key, got[key], want[key], 1e-5)
    for snapshot, model in zip(before, [base, *tuned]):
        for key, value in model.state_dict().items():
            assert torch.equal(value, snapshot[key]), f"input {key} was modified"


def test_merge_report_logs_conditioning():
    tvs = layer_task_vectors((64, 48), 4, shared=0.9, seed=1)
    _, report = tsv_fast.fast_tsv_merge(tvs, return_report=True)
    layer = report.layers["blocks.0.w"]
    assert layer.k == 12 and layer.rank_u == 48 and layer.rank_v == 48
    u, _, _ = reference.layer_factors_ref([tv["blocks.0.w"] for tv in tvs], 12)
    assert layer.kappa_u == pytest.approx(float(torch.linalg.cond(u)), rel=1e-6)
    assert report.backend == "torch" and report.averaged == ["blocks.0.b"]


def test_task_arithmetic_matches_reference():
    tvs = layer_task_vectors((20, 10), 3, seed=2)
    pre = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
    got = tsv_fast.task_arithmetic(pre, tvs, alpha=0.3)
    want = reference.task_arithmetic(pre, tvs, alpha=0.3)
    for key in want:
        assert_rel_close(key, got[key], want[key], 1e-12)


def test_backend_dispatch_reasons():
    from tsv_fast.backends import resolve_backend, unavailable_reasons

    assert resolve_backend("auto", "cpu").name == "torch"
    assert resolve_backend("torch", "cpu").name == "torch"
    assert "unknown backend" in unavailable_reasons("nope")[0]
    with pytest.raises(RuntimeError, match="cusolver"):
        tsv_fast.fast_tsv_merge(layer_task_vectors((8, 8), 2), backend="cusolver")


def test_chunking_by_memory_budget_gives_the_same_result():
    from tsv_fast import Options, fast_tsv_merge
    from tsv_fast.io.checkpoint import DictCheckpoint

    tvs = [{f"blocks.{i}.w": d for i, d in enumerate(task_matrices((30, 20), 5, seed=j))} for j in range(3)]
    sources = [DictCheckpoint(tv) for tv in tvs]
    one_by_one = fast_tsv_merge(sources, options=Options(compute_dtype=torch.float64, max_chunk_bytes=1))
    batched = fast_tsv_merge(sources, options=Options(compute_dtype=torch.float64))
    want = reference.fast_tsv_merge(tvs, compute_dtype=torch.float64)
    for key in want:
        assert_rel_close(key, one_by_one[key], want[key], FLOAT64_BOUND)
        assert_rel_close(key, batched[key], want[key], FLOAT64_BOUND)


def test_tasks_are_batched_when_one_layer_exceeds_the_budget():
    from tsv_fast import Options, fast_tsv_merge
    from tsv_fast.io.checkpoint import DictCheckpoint

    tvs = [{"w": d} for d in task_matrices((40, 30), 6, shared=0.4, seed=12)]
    per_matrix = 40 * 30 * 8 * 3
    options = Options(compute_dtype=torch.float64, max_chunk_bytes=2 * per_matrix)  # two tasks at a time
    merged = fast_tsv_merge([DictCheckpoint(tv) for tv in tvs], options=options)
    want = reference.fast_tsv_merge(tvs, compute_dtype=torch.float64)
    assert_rel_close("task-batched", merged["w"], want["w"], FLOAT64_BOUND)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072)])
def test_cuda_merge_matches_reference_at_layer_shape(shape):
    tvs64 = [{"w": d} for d in task_matrices(shape, 8, shared=0.5, seed=13)]
    want = reference.fast_tsv_merge(tvs64, compute_dtype=torch.float64)["w"]
    tvs32 = [{"w": tv["w"].float()} for tv in tvs64]
    authors = reference.authors_fast_tsv_merge(tvs32)["w"]
    got = tsv_fast.fast_tsv_merge([{"w": tv["w"].cuda()} for tv in tvs32])["w"]
    assert got.is_cuda
    assert_rel_close(f"cuda {shape}", got.cpu(), want, contract_bound(rel_fro(authors, want)))
