"""The cuSOLVER extension (tsv_fast._C) and its backend.

GPU tests need CUDA and the built extension and skip otherwise, saying which (on the GPU
acceptance run, bench/gpu_check.sh, a skip fails). CPU tests cover what can be checked anywhere: the
unavailability reasons, input validation before the extension is touched, and the factor check of
the approximate routines. setup.py and the compiled bindings without a device:
tests/test_cusolver_build.py.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsv_fast.backends import cusolver as cs
from tsv_fast.testing import assert_rel_close

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
EXT_REASON = cs.extension_unavailable_reason() if HAS_CUDA else "no CUDA device"
needs_ext = pytest.mark.skipif(not HAS_CUDA or EXT_REASON is not None,
                               reason=f"needs CUDA and the built tsv_fast._C ({EXT_REASON})")


# ---------------------------------------------------------------------------------------------
# Inputs with a prescribed spectrum: a clear gap after k so the top-k subspace is well defined.
def gapped(batch, m, n, k, *, dtype=torch.float64, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    mats = []
    for _ in range(batch):
        u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
        s = torch.cat([torch.linspace(2.0, 1.0, k, dtype=torch.float64),
                       torch.linspace(0.3, 0.01, r - k, dtype=torch.float64)])
        mats.append((u * s) @ v.T)
    return torch.stack(mats).to(device=device, dtype=dtype)


def topk_ref(A, k):
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return U[..., :k], S[..., :k], Vh[..., :k, :].mT


def recon(U, S, V):
    return (U * S.unsqueeze(-2)) @ V.mT


def sym(batch, n, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    evals = torch.linspace(-1.0, 3.0, n, dtype=torch.float64)  # distinct, well separated
    return ((q * evals) @ q.mT).to(device="cuda", dtype=dtype)


# gesvda is documented as approximate (an eigensolve of AᵀA): a looser float64 bound for it.
# gesvdr is randomized: with a block of 2k, 10 power iterations and the gap 1 -> 0.3 of these
# inputs it converges far below 1e-8.
TOL64 = {"gesvda": 1e-6, "auto": 1e-9, "gesvdj_batched": 1e-9, "gesvdj": 1e-9, "gesvd": 1e-9,
         "gesvdp": 1e-9, "gesvdr": 1e-8}

SVD_CASES = [  # (batch, m, n, k, method)
    (5, 40, 24, 6, "gesvda"),
    (3, 24, 40, 6, "gesvda"),    # wide: transposed onto the tall path
    (4, 17, 13, 5, "gesvdj_batched"),
    (4, 13, 17, 5, "gesvdj_batched"),
    (4, 32, 32, 8, "auto"),
    (3, 50, 30, 7, "gesvdj"),
    (3, 30, 50, 7, "gesvdj"),
    (3, 50, 30, 7, "gesvd"),
    (3, 30, 50, 7, "gesvd"),
    (3, 50, 30, 7, "gesvdp"),
    (3, 30, 50, 7, "gesvdp"),
    (3, 60, 40, 6, "gesvdr"),
    (3, 40, 60, 6, "gesvdr"),
    (2, 96, 64, 64, "gesvda"),  # k = min(m, n)
    (1, 1, 17, 1, "gesvdj"),
]


# ------------------------------------------------------------------------------- GPU: SVD
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("batch,m,n,k,method", SVD_CASES)
def test_svd_float64_parity(batch, m, n, k, method):
    A = gapped(batch, m, n, k, seed=m * n + k)
    A_before = A.clone()
    U, S, V = cs.batched_topk_svd(A, k, method)
    assert U.shape == (batch, m, k) and S.shape == (batch, k) and V.shape == (batch, n, k)
    Ur, Sr, Vr = topk_ref(A, k)
    name = f"{method} {batch}x{m}x{n} k={k}"
    tol = TOL64[method]
    assert_rel_close(f"{name} singular values", S, Sr, tol)
    assert_rel_close(f"{name} rank-k reconstruction", recon(U, S, V), recon(Ur, Sr, Vr), tol)
    assert_rel_close(f"{name} left projector", U @ U.mT, Ur @ Ur.mT, tol)
    assert_rel_close(f"{name} right projector", V @ V.mT, Vr @ Vr.mT, tol)
    assert torch.equal(A, A_before), f"{name}: the input was modified"


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("method", ["gesvda", "gesvdj", "gesvd", "gesvdp", "gesvdr"])
def test_svd_float32(method):
    A = gapped(4, 64, 48, 8, seed=3)
    U, S, V = cs.batched_topk_svd(A.float(), 8, method)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    Ur, Sr, Vr = topk_ref(A, 8)
    assert_rel_close(f"{method} fp32 reconstruction", recon(U, S, V), recon(Ur, Sr, Vr), 1e-4)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("layout", ["column_major", "sliced", "leading_dims"])
def test_svd_layouts(layout):
    base = gapped(6, 40, 24, 5, seed=11)
    if layout == "column_major":  # a transposed view: no copy needed by the extension
        A = base.mT.contiguous().mT
    elif layout == "sliced":  # non-contiguous: a slice of a larger buffer
        big = torch.full((6, 40, 30), float("nan"), dtype=torch.float64, device="cuda")
        big[..., :24] = base
        A = big[..., :24]
    else:
        A = base.view(2, 3, 40, 24)
    U, S, V = cs.batched_topk_svd(A, 5, "gesvda")
    Ur, Sr, Vr = topk_ref(base, 5)
    got = recon(U, S, V).reshape(6, 40, 24)
    assert_rel_close(f"{layout} reconstruction", got, recon(Ur, Sr, Vr), TOL64["gesvda"])


@pytest.mark.gpu
@needs_ext
def test_svd_raw_extension_returns_info():
    A = gapped(3, 40, 24, 24, seed=5)
    U, S, V, info, err = cs._ext().batched_svd(A, 24, "gesvda", True)
    assert info.device.type == "cuda" and info.dtype == torch.int32 and int(info.abs().sum()) == 0
    assert err.numel() == 0  # gesvda's h_RnrmF is not requested (it is no residual for k < n)
    assert_rel_close("gesvda k = n reconstruction", recon(U, S, V), A, TOL64["gesvda"])


@pytest.mark.gpu
@needs_ext
def test_svd_gesvdp_returns_finite_error_estimates():
    A = gapped(3, 50, 30, 7, seed=8)
    U, S, V, info, err_sigma = cs._ext().batched_svd(A, 7, "gesvdp", True)
    assert int(info.abs().sum()) == 0
    assert err_sigma.shape == (3,) and err_sigma.device.type == "cpu"
    assert bool(torch.isfinite(err_sigma).all()) and bool((err_sigma >= 0).all()), err_sigma


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("method,m,n,k", [("gesvda", 40, 24, 5), ("gesvda", 24, 40, 5), ("gesvdj_batched", 17, 13, 4)])
def test_svd_batches_are_split_at_the_32bit_bound(method, m, n, k):
    """A lowered element bound forces several calls (as batch·stride > INT32_MAX would); same result."""
    A = gapped(7, m, n, k, seed=21)
    whole = cs.batched_topk_svd(A, k, method)
    split = cs.batched_topk_svd(A, k, method, max_batch_elements=3 * m * n)  # 3 matrices per call
    assert_rel_close(f"{method} split batches", recon(*split), recon(*whole), TOL64[method])
    assert_rel_close(f"{method} split batches vs float64", recon(*split), recon(*topk_ref(A, k)), TOL64[method])
    with pytest.raises(RuntimeError, match="one matrix needs"):
        cs.batched_topk_svd(A, k, method, max_batch_elements=m * n - 1)


@pytest.mark.gpu
@needs_ext
def test_gesvdr_argument_limits():
    A = gapped(2, 40, 30, 6, seed=2)
    with pytest.raises(RuntimeError, match=r"gesvdr needs k < min\(m, n\)"):
        cs.batched_topk_svd(A, 30, "gesvdr")
    with pytest.raises(RuntimeError, match=r"k \+ oversample < min\(m, n\)"):
        cs.batched_topk_svd(A, 6, "gesvdr", oversample=24)
    U, S, V = cs.batched_topk_svd(A, 6, "gesvdr", oversample=23)  # the largest block allowed
    assert_rel_close("gesvdr k + p = min - 1", recon(U, S, V), recon(*topk_ref(A, 6)), TOL64["gesvdr"])


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("method", ["gesvda", "gesvdj", "gesvd", "gesvdp", "gesvdj_batched"])
def test_nonfinite_input_raises_and_unchecked_calls_return_info(method):
    m, n = (20, 12) if method == "gesvdj_batched" else (40, 24)
    A = gapped(3, m, n, 4, seed=4)
    A[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="matrix 1 of the batch contains NaN or Inf"):
        cs.batched_topk_svd(A, 4, method)
    *_, info = cs.batched_topk_svd(A, 4, method, check=False, return_info=True)  # no check, no raise
    assert info.shape == (3,) and info.dtype == torch.int32 and info.device.type == "cuda"
    assert int(info[0]) == 0 and int(info[2]) == 0  # the finite matrices of the batch succeeded


@pytest.mark.gpu
@needs_ext
def test_gesvda_rank_deficient_input_passes_the_factor_check():
    """A rank-3 matrix (a LoRA delta) asked for k = 6: the top 3 triplets are exact, the rest σ ≈ 0."""
    g = torch.Generator().manual_seed(9)
    A = (torch.randn(4, 60, 3, generator=g, dtype=torch.float64) @ torch.randn(4, 3, 40, generator=g,
                                                                                  dtype=torch.float64)).cuda()
    U, S, V = cs.batched_topk_svd(A, 6, "gesvda")
    assert bool(torch.isfinite(U).all() and torch.isfinite(V).all())
    assert_rel_close("gesvda rank-deficient reconstruction", recon(U, S, V), A, TOL64["gesvda"])


@pytest.mark.gpu
@needs_ext
def test_solvers_release_the_gil():
    """Another Python thread keeps running while the extension blocks on the GPU."""
    import threading
    import time

    A = gapped(16, 256, 192, 32, seed=1)
    ticks, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.0005)

    cs.batched_topk_svd(A, 32, "gesvdp")  # warm-up: handles, workspaces, library load
    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.01)
    before, start = ticks[0], time.perf_counter()
    cs.batched_topk_svd(A, 32, "gesvdp")  # 16 synchronous Xgesvdp calls
    elapsed, during = time.perf_counter() - start, ticks[0] - before
    stop.set()
    thread.join()
    # holding the GIL for the whole call would allow ~1 tick (at the call's start); a free GIL
    # allows one per 0.5 ms sleep, minus scheduling noise
    assert during >= max(3, 0.1 * elapsed / 0.0005), f"{during} ticks in {elapsed * 1e3:.1f} ms"


# ------------------------------------------------------------------------------- GPU: eigh
EIGH_CASES = [(n, method) for n in (5, 32, 33, 100) for method in ("auto", "syevj_batched", "syev_batched", "syevd")
              if not (method == "syevj_batched" and n > 32)]  # syevjBatched is for n <= 32


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("n,method", EIGH_CASES)
def test_eigh_float64_parity(n, method):
    if method == "syev_batched" and not cs._ext().has_xsyev_batched():
        pytest.skip("built without cusolverDnXsyevBatched (CUDA < 12.6u2)")
    A = sym(4, n, seed=n)
    # Garbage in the strict upper triangle: only the lower one may be read, like torch.
    A_lower_only = A.tril() + torch.triu(torch.full_like(A, 7.0), diagonal=1)
    w, Z = cs.batched_eigh(A_lower_only, method)
    wr, Zr = torch.linalg.eigh(A_lower_only)
    assert_rel_close(f"{method} n={n} eigenvalues", w, wr, 1e-12)
    assert_rel_close(f"{method} n={n} reconstruction", (Z * w.unsqueeze(-2)) @ Z.mT, A, 1e-12)
    assert_rel_close(f"{method} n={n} orthonormality", Z.mT @ Z,
                     torch.eye(n, dtype=A.dtype, device=A.device).expand_as(A), 1e-12)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("n,method", [(20, "syevj_batched"), (40, "syev_batched")])
def test_eigh_batches_are_split_at_the_32bit_bound(n, method):
    A = sym(7, n, seed=3)
    w, Z = cs.batched_eigh(A, method, max_batch_elements=2 * n * n)  # 2 matrices per call
    assert_rel_close(f"{method} split eigenvalues", w, torch.linalg.eigh(A).eigenvalues, 1e-12)
    assert_rel_close(f"{method} split reconstruction", (Z * w.unsqueeze(-2)) @ Z.mT, A, 1e-12)
    *_, info = cs.batched_eigh(A, method, check=False, return_info=True)
    assert info.shape == (7,) and int(info.abs().sum()) == 0


@pytest.mark.gpu
@needs_ext
def test_eigh_float32_and_leading_dims():
    A = sym(6, 48, seed=1).view(2, 3, 48, 48)
    w, Z = cs.batched_eigh(A.float())
    assert w.shape == (2, 3, 48) and Z.shape == (2, 3, 48, 48) and w.dtype == torch.float32
    assert_rel_close("fp32 eigenvalues", w, torch.linalg.eigh(A).eigenvalues, 1e-5)


# ------------------------------------------------------------------------------- GPU: errors
@pytest.mark.gpu
@needs_ext
def test_bad_inputs_raise_readable_errors():
    A = gapped(2, 40, 40, 4)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cs.batched_topk_svd(A.cpu(), 4)
    with pytest.raises(TypeError, match="float32 or float64"):
        cs.batched_topk_svd(A.half(), 4)
    with pytest.raises(ValueError, match="k must satisfy"):
        cs.batched_topk_svd(A, 41)
    with pytest.raises(ValueError, match="square"):
        cs.batched_eigh(A[:, :, :39])
    ext = cs._ext()
    with pytest.raises(RuntimeError, match="up to 32 x 32"):
        ext.batched_svd(A, 4, "gesvdj_batched", True)
    with pytest.raises(RuntimeError, match="unknown method"):
        ext.batched_eigh(A, "nope", True, True)
    with pytest.raises(RuntimeError, match=r"expected a batch of matrices \[B, m, n\]"):
        ext.batched_svd(A[0], 4, "auto", True, True)
    with pytest.raises(RuntimeError, match="expected float32 or float64"):
        ext.batched_eigh(A.to(torch.bfloat16), "auto", True, True)


# ------------------------------------------------------------------------------- GPU: backend
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("route", ["gram", "svd"])
def test_backend_task_factors_match_torch_backend(route):
    from tsv_fast.backends import TorchBackend, resolve_backend

    backend = resolve_backend("cusolver", "cuda")
    backend.factor_route = route
    L, T, m, n, k = 2, 3, 48, 40, 6
    pre = torch.randn(L, m, n, dtype=torch.float64, device="cuda")
    ft = pre.unsqueeze(1) + gapped(L * T, m, n, k, seed=7).view(L, T, m, n)
    got = recon(*backend.task_factors(ft, pre, k))
    want = recon(*TorchBackend().task_factors(ft, pre, k))
    assert_rel_close(f"task_factors route={route}", got, want, 1e-9 if route == "gram" else TOL64["gesvda"])
    stack = torch.randn(L, m, 12, dtype=torch.float64, device="cuda")
    x_got, _, ev_got = backend.orthogonalize(stack)
    x_want, _, ev_want = TorchBackend().orthogonalize(stack)
    assert_rel_close("orthogonalize", x_got, x_want, 1e-10)
    assert_rel_close("orthogonalize Gram eigenvalues", ev_got, ev_want, 1e-12)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("route,shape", [("gram", (1536, 384)), ("svd", (384, 1536))])
def test_merge_through_the_cusolver_backend_meets_the_contract(route, shape, monkeypatch):
    """The whole merge on CUDA with backend="cusolver" (T = 8, float32 task vectors): within the
    accuracy contract of the float64 reference, max(1e-5, 3 x the authors' float32 error)."""
    import tsv_fast
    from tsv_fast import reference
    from tsv_fast.synthetic import task_matrices
    from tsv_fast.testing import contract_bound, rel_fro

    monkeypatch.setattr(cs.CusolverBackend.__init__, "__defaults__", (route, "auto"))
    tvs64 = [{"w": d} for d in task_matrices(shape, 8, shared=0.5, seed=17)]
    want = reference.fast_tsv_merge(tvs64, compute_dtype=torch.float64)["w"]
    tvs32 = [{"w": tv["w"].float()} for tv in tvs64]
    authors = reference.authors_fast_tsv_merge(tvs32)["w"]
    got, report = tsv_fast.fast_tsv_merge([{"w": tv["w"].cuda()} for tv in tvs32], backend="cusolver",
                                          return_report=True)
    assert report.backend == "cusolver" and got["w"].is_cuda
    assert_rel_close(f"cusolver merge route={route} {shape}", got["w"].cpu(), want,
                     contract_bound(rel_fro(authors, want)))


# ------------------------------------------------------------------------------- CPU
def test_backend_reports_why_unavailable_on_cpu():
    reasons = cs.CusolverBackend().unavailable_reasons(torch.device("cpu"))
    assert any("needs a CUDA device" in r for r in reasons), reasons
    assert all(r.startswith("cusolver: ") for r in reasons), reasons
    if not cs.build_info().get("built"):
        assert any("tsv_fast._C" in r for r in reasons), reasons
    reasons = cs.CusolverBackend().unavailable_reasons(torch.device("cpu"), torch.float16)
    assert any("float32/float64" in r for r in reasons), reasons


def test_explicit_cusolver_backend_on_cpu_raises_with_reasons():
    from tsv_fast.backends import resolve_backend

    with pytest.raises(RuntimeError, match="backend 'cusolver' cannot run on cpu: cusolver: needs a CUDA device"):
        resolve_backend("cusolver", "cpu")


@pytest.mark.skipif(HAS_CUDA and EXT_REASON is None, reason="the extension is available here")
def test_calling_the_missing_extension_names_the_reason():
    with pytest.raises(RuntimeError, match="cusolver backend unavailable: tsv_fast._C"):
        cs._ext()


def test_inputs_are_validated_before_the_extension_is_needed():
    A = torch.zeros(2, 8, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected a CUDA tensor, got one on cpu"):
        cs.batched_topk_svd(A, 2)
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        cs.batched_eigh(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="expected matrices"):
        cs.batched_topk_svd(torch.zeros(3), 1)


def test_factor_check_accepts_exact_triplets_and_rejects_perturbed_ones():
    """check_topk_factors (the verification of gesvda / gesvdr) on exact and on spoiled factors."""
    A = gapped(3, 30, 20, 5, device="cpu", seed=6)
    U, S, V = topk_ref(A, 5)
    cs.check_topk_factors(A, U, S, V)
    cs.check_topk_factors(A.float(), U.float(), S.float(), V.float())
    # rank-deficient: vectors of σ = 0 are arbitrary and must not fail the check
    low = A[:, :, :3] @ torch.randn(3, 3, 20, dtype=torch.float64)
    Ul, Sl, Vl = topk_ref(low, 5)
    Ul[..., 3:] = torch.randn_like(Ul[..., 3:])
    cs.check_topk_factors(low, Ul, Sl, Vl)
    # a wrong subspace with consistent factors (A V = U S exactly): only ‖AᵀU − VS‖ sees it
    q = torch.linalg.qr(torch.randn(3, 20, 5, dtype=torch.float64))[0]
    p_, s_wrong, w_h = torch.linalg.svd(A @ q, full_matrices=False)
    spoiled = {"subspace": (p_, s_wrong, q @ w_h.mT),
               "U": (U + 1e-3 * torch.randn_like(U), S, V), "S": (U, S * 1.01, V),
               "V": (U, S, V + 1e-3 * torch.randn_like(V)), "order": (U, S.flip(-1), V),
               "nan": (U, torch.where(S == S.amax(), float("nan"), S), V)}
    for what, (u, s_, v) in spoiled.items():
        with pytest.raises(RuntimeError, match="gesvda returned inaccurate factors for matrix 0"):
            cs.check_topk_factors(A, u, s_, v, routine="gesvda")


def test_nonfinite_matrices_are_named():
    A = torch.zeros(4, 5, 3)
    cs.check_finite(A, "f")
    A[2, 1, 1] = float("inf")
    A[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"f: matrix 2 of the batch contains NaN or Inf \(2 of 4 matrices\)"):
        cs.check_finite(A, "f")


def test_unchecked_calls_must_take_the_info():
    A = torch.zeros(2, 8, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="check=False would drop the per-matrix info"):
        cs.batched_topk_svd(A, 2, check=False)
    with pytest.raises(ValueError, match="check=False would drop the per-matrix info"):
        cs.batched_eigh(torch.zeros(2, 4, 4), check=False)


def test_importing_the_backend_does_not_load_the_extension():
    code = ("import sys, torch\n"
            "import tsv_fast.backends.cusolver as cs\n"
            "assert 'tsv_fast._C' not in sys.modules\n"
            "cs.CusolverBackend().unavailable_reasons(torch.device('cpu'))\n"
            "assert 'tsv_fast._C' not in sys.modules\n"
            "assert not torch.cuda.is_initialized()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
