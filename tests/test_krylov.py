"""The certified block-Krylov top-k (tsv_fast.backends.krylov) and the torch backend's top-k routes,
against the float64 SVD (singular values, projectors, true residuals) and the float64 reference merge
(the accuracy contract of DESIGN.md §2), on every spectrum class; speed is measured in
bench/bench_topk.py, never here."""
import math

import pytest
import torch

import tsv_fast
from tsv_fast import reference
from tsv_fast.backends import _lapack, krylov, torch_backend
from tsv_fast.backends.torch_backend import TorchBackend, krylov_unsuitable
from tsv_fast.synthetic import task_matrices
from tsv_fast.testing import assert_rel_close, contract_bound, rel_fro

F64 = torch.float64


def deltas32(shape, num_tasks, **kind):
    """fp32 task matrices; their float64 values are the exact inputs every error is measured on."""
    return task_matrices(shape, num_tasks, **kind).float()


def tolerance(delta):
    return krylov.TOL_FACTOR * krylov.U32 * torch.linalg.vector_norm(delta.double(), dim=(-2, -1))


def true_residuals(delta, u, s, v):
    """max over triplets of ‖ΔV - Uσ‖ and ‖ΔᵀU - Vσ‖ in float64, per task."""
    d = delta.double()
    right = torch.linalg.vector_norm(d @ v - u * s.unsqueeze(-2), dim=-2).amax(-1)
    left = torch.linalg.vector_norm(d.mT @ u - v * s.unsqueeze(-2), dim=-2).amax(-1)
    return torch.maximum(right, left)


def check_against_svd(delta, k, u, s, v, certified):
    """Certified tasks: true residuals within τ (plus the fp32 rounding of the certificate itself),
    σ and projectors within what those residuals allow (Weyl; Wedin's sin θ <= ‖R‖_F / gap)."""
    tol = tolerance(delta)
    residual = true_residuals(delta, u, s, v)
    want_u, want_s, want_v = reference.topk_svd_ref(delta.double(), k)
    full = torch.linalg.svdvals(delta.double())
    for i in certified.nonzero().flatten().tolist():
        assert residual[i] <= 1.25 * tol[i], f"task {i}: true residual {residual[i]:.3e} > certified {tol[i]:.3e}"
        block = math.sqrt(2 * k) * tol[i]  # ‖R‖_F of the whole certified block
        assert (s[i] - want_s[i]).abs().max() <= block, f"task {i}: singular values"
        gap = float(full[i, k - 1] - full[i, k]) if k < full.shape[-1] else math.inf
        if gap <= 0:  # a zero task, or rank < k: the kept triplets are compared by reconstruction
            continue
        for name, got, want in (("V", v[i], want_v[i]), ("U", u[i], want_u[i])):
            error = torch.linalg.matrix_norm(got @ got.mT - want @ want.mT)
            assert error <= 4 * block / gap, f"task {i}: projector {name} {error:.2e}, gap {gap:.2e}"


SPECTRA = [dict(kind="decay"), dict(kind="fast_decay"), dict(kind="clustered"), dict(kind="decay", rank=12)]


@pytest.mark.parametrize("shape", [(360, 240), (240, 360)])
@pytest.mark.parametrize("spectrum", SPECTRA, ids=["decay", "fast_decay", "clustered", "rank12"])
def test_topk_is_certified_and_matches_the_svd(shape, spectrum):
    delta = deltas32(shape, 3, shared=0.5, seed=sum(shape), **spectrum)
    k = 24
    tall = delta if shape[0] >= shape[1] else delta.mT
    u, s, v, certified, steps = krylov.krylov_topk(tall, k, dim_limit=200)  # room for the slow spectra
    if tall is not delta:
        u, v = v, u
    assert bool(certified.all()) and int(steps.max()) >= 1
    check_against_svd(delta, k, u, s, v, certified)
    if "rank" in spectrum:  # rank 12 < k: the rest are zero columns with σ = 0, as in the Gram route
        assert bool((s[:, 12:] == 0).all()) and bool((u[..., 12:] == 0).all()) and bool((v[..., 12:] == 0).all())


def test_zero_and_identical_tasks():
    delta = deltas32((360, 240), 3, seed=4)
    delta[1] = 0
    delta[2] = delta[0]
    u, s, v, certified, _ = krylov.krylov_topk(delta, 20)
    assert bool(certified.all()) and bool(torch.isfinite(u).all())
    assert bool((s[1] == 0).all()) and bool((u[1] == 0).all()) and bool((v[1] == 0).all())
    check_against_svd(delta, 20, u, s, v, certified)
    assert_rel_close("identical tasks", (u[2] * s[2]) @ v[2].mT, (u[0] * s[0]) @ v[0].mT, 1e-6)


def test_certificate_fails_when_stopped_early():
    """A Krylov space of one block past k cannot hold the top-k of a slowly decaying spectrum to τ:
    the certificate must say so, and say it truthfully (true residuals far above τ)."""
    delta = deltas32((360, 240), 4, shared=0.3, seed=9, kind="decay")
    k = 30
    u, s, v, certified, steps = krylov.krylov_topk(delta, k, dim_limit=k + 32)
    assert not bool(certified.any())
    assert bool((true_residuals(delta, u, s, v) > 10 * tolerance(delta)).all())
    # the same iteration given its budget certifies every task
    assert bool(krylov.krylov_topk(delta, k)[3].all())


def test_uncertified_tasks_fall_back_to_the_gram_route(monkeypatch):
    delta = deltas32((360, 240), 4, shared=0.3, seed=9)
    monkeypatch.setattr(krylov, "U32", 0.0)  # τ = 0: nothing certifies
    krylov.STATS.clear()
    backend = TorchBackend()
    backend.topk = "krylov"
    u, s, v = backend.task_factors(delta[None], None, 30)
    assert krylov.STATS["fallback"] == 4
    backend.topk = "gram"
    want = backend.task_factors(delta[None], None, 30)
    assert_rel_close("fallback = Gram route", (u * s.unsqueeze(-2)) @ v.mT, (want[0] * want[1].unsqueeze(-2)) @ want[2].mT,
                     1e-12)


CASES = [(kind, shared, tasks) for kind in ("decay", "fast_decay", "clustered") for shared in (0.0, 0.5, 0.9)
         for tasks in (2, 8, 20) if (shared, tasks) != (0.5, 20)]


@pytest.mark.parametrize("kind,shared,num_tasks", CASES)
def test_merge_within_contract(monkeypatch, kind, shared, num_tasks):
    """TSV-M through the Krylov route within max(1e-5, 3x the authors' float32 error) of the float64
    reference; at T = 2 k is half the rank, where the route hands every task to the Gram route."""
    monkeypatch.setenv("TSV_FAST_TOPK", "krylov")
    monkeypatch.setitem(torch_backend.KRYLOV_BUDGET, "cpu", 1.0)  # correctness here, not economics
    tvs64 = [{"w": d} for d in task_matrices((360, 240), num_tasks, shared=shared, kind=kind, seed=num_tasks)]
    tvs32 = [{"w": tv["w"].float()} for tv in tvs64]
    want = reference.fast_tsv_merge(tvs64, compute_dtype=F64)["w"]
    authors = reference.authors_fast_tsv_merge(tvs32)["w"]
    krylov.STATS.clear()
    got = tsv_fast.fast_tsv_merge(tvs32)["w"]
    runs = num_tasks != 2  # k = 120 of 240 leaves no room for a Krylov space
    assert krylov.STATS["tasks"] == runs * num_tasks and krylov.STATS["certified"] == runs * num_tasks
    assert_rel_close(f"{kind} shared={shared} T={num_tasks}", got, want, contract_bound(rel_fro(authors, want)))


def test_merge_edge_cases_within_contract(monkeypatch):
    """Rank-deficient, identical and zero tasks, a wide layer: each merged as the reference does."""
    monkeypatch.setenv("TSV_FAST_TOPK", "krylov")
    monkeypatch.setitem(torch_backend.KRYLOV_BUDGET, "cpu", 1.0)
    low = task_matrices((240, 360), 6, rank=10, shared=0.4, seed=3)
    full = task_matrices((240, 360), 6, shared=0.4, seed=5)
    tasks = [low[0], low[1], low[1].clone(), torch.zeros(240, 360, dtype=F64), full[4], full[5]]
    tvs64 = [{"w": d} for d in tasks]
    want = reference.fast_tsv_merge(tvs64, compute_dtype=F64)["w"]
    krylov.STATS.clear()
    got = tsv_fast.fast_tsv_merge([{"w": tv["w"].float()} for tv in tvs64])["w"]
    assert krylov.STATS["tasks"] == 6 and krylov.STATS["certified"] == 6
    assert_rel_close("edge cases", got, want, 1e-5)


@pytest.mark.parametrize("route", ["gram", "krylov"])
def test_routes_spread_tasks_over_threads(route):
    """Two worker threads give what one gives, from inputs they leave untouched."""
    delta = deltas32((300, 200), 5, shared=0.3, seed=1)
    pre = torch.randn(2, 300, 200)
    finetuned = (pre.unsqueeze(1) + delta[None]).expand(2, 5, 300, 200).clone()
    finetuned[1] = pre[1] + delta.flip(0)
    before = finetuned.clone()
    backend = TorchBackend()
    backend.topk = route
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backend.task_factors(finetuned, pre, 25)
        torch.set_num_threads(2)
        two = backend.task_factors(finetuned, pre, 25)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(finetuned, before)
    rebuild = lambda f: (f[0] * f[1].unsqueeze(-2)) @ f[2].mT  # noqa: E731
    exact = finetuned.double() - pre.double().unsqueeze(1)
    want = reference.topk_svd_ref(exact, 25)
    assert_rel_close(f"{route}: 1 vs 2 threads", rebuild(two), rebuild(one), 1e-10)
    assert_rel_close(f"{route}: vs float64 SVD", rebuild(one), rebuild(want), 1e-5)


def test_auto_route_reasons(monkeypatch):
    cpu = torch.device("cpu")
    backend = TorchBackend()
    assert "keeps the Gram route" in krylov_unsuitable((3072, 768), 96, torch.float32, cpu)
    assert backend.topk_route((3072, 768), 96, torch.float32, cpu) == "gram"
    monkeypatch.setitem(torch_backend.KRYLOV_AUTO, "cpu", 0.2)
    assert krylov_unsuitable((3072, 768), 96, torch.float32, cpu) is None
    assert "float64" in krylov_unsuitable((3072, 768), 96, F64, cpu)
    assert "crossover" in krylov_unsuitable((4096, 4096), 1024, torch.float32, cpu)
    assert "no room" in krylov_unsuitable((96, 60), 30, torch.float32, cpu, route="krylov")
    assert krylov_unsuitable((240, 160), 20, F64, cpu, route="krylov") is None
    assert backend.topk_route((3072, 768), 96, torch.bfloat16, cpu) == "krylov"
    assert backend.topk_route((64, 48), 6, torch.float32, cpu) == "gram"
    backend.topk = "nope"
    with pytest.raises(ValueError, match="top-k route"):
        backend.topk_route((64, 48), 6, torch.float32, cpu)


def test_lapack_calls_match_torch():
    x = torch.randn(70, 30, dtype=F64)
    for array in (x.numpy(), x.numpy().copy(order="F")):
        assert_rel_close("dsyrk Gram", torch.from_numpy(_lapack.gram(array)), x.mT @ x, 1e-14)
    g = x.mT @ x
    values, vectors = _lapack.top_eigh(g.numpy().copy(), 5)
    want_values, want_vectors = torch.linalg.eigh(g)
    assert_rel_close("dsyevr values", torch.from_numpy(values), want_values[-5:].flip(0), 1e-13)
    vectors, want_vectors = torch.from_numpy(vectors), want_vectors[:, -5:]
    assert_rel_close("dsyevr projector", vectors @ vectors.mT, want_vectors @ want_vectors.mT, 1e-10)


def test_bench_topk_rows_and_table():
    """bench/bench_topk.py's code path at a small shape: every provider timed, checked and rendered."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("tsv_bench_topk", bench_dir / "bench_topk.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        saved = torch.get_num_threads()
        try:
            rows = bench.op_rows("small", (480, 320), 8, [1], 1, log=lambda *_: None)
        finally:
            torch.set_num_threads(saved)
    finally:
        sys.path.remove(str(bench_dir))
    assert [row["provider"] for row in rows] == ["authors", "gram", "krylov"]
    for row in rows:
        assert row["per_task_ms"] > 0 and row["rec_err"] < 1e-5, row
    krylov_row = rows[2]
    assert 0 <= krylov_row["fallback"] <= 8 and krylov_row["mean_steps"] >= 1 and math.isfinite(krylov_row["floor_ms"])
    assert krylov_row["resid_u32F"] <= 1.25 * krylov.TOL_FACTOR  # certified, or recomputed by the Gram route
    assert "| small 480×320 | 8 | 40 |" in bench.render({"meta": {"device_name": "cpu", "torch": "", "git_sha": "",
                                                                    "timestamp": "", "command": ""}, "rows": rows})
