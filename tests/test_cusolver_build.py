"""The build of tsv_fast._C: setup.py's decisions (CPU), and the compiled bindings' argument checks
without a device (run by .ci/link_check.sh against a CUDA build of torch; skipped elsewhere)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsv_fast.backends import cusolver as cs

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


_EXT_IMPORTS = cs.extension_unavailable_reason() is None


@pytest.mark.skipif(HAS_CUDA or not _EXT_IMPORTS,
                    reason="needs the built extension on a machine without a GPU (bash .ci/link_check.sh)")
def test_extension_validates_arguments_without_a_device():
    """The compiled bindings reject bad arguments with one-line errors before needing a device,
    and a CPU tensor with a clear device error (.ci/link_check.sh runs this against a CUDA torch)."""
    ext = cs._ext()
    A = torch.zeros(2, 40, 30, dtype=torch.float64)
    cases = [
        (lambda: ext.batched_svd(A, 31, "gesvda"), r"k must satisfy 1 <= k <= min\(m, n\) = 30"),
        (lambda: ext.batched_svd(A, 4, "nope"), "unknown method 'nope'"),
        (lambda: ext.batched_svd(A, 4, "gesvdj_batched"), "supports matrices up to 32 x 32"),
        (lambda: ext.batched_svd(A, 30, "gesvdr"), r"gesvdr needs k < min\(m, n\) = 30"),
        (lambda: ext.batched_svd(A, 6, "gesvdr", True, 24), r"k \+ oversample < min\(m, n\)"),
        (lambda: ext.batched_svd(A, 4, "gesvda", True, -1, 10, 0), "max_batch_elements must be in"),
        (lambda: ext.batched_svd(A[0], 4), r"expected a batch of matrices \[B, m, n\]"),
        (lambda: ext.batched_svd(A.to(torch.bfloat16), 4), "expected float32 or float64"),
        (lambda: ext.batched_svd(A[:, :0], 1), "matrices must be non-empty"),
        (lambda: ext.batched_svd(A, 4), "expected a CUDA tensor, got one on cpu"),
        (lambda: ext.batched_eigh(A), r"expected square matrices \[B, n, n\]"),
        (lambda: ext.batched_eigh(A[:, :30], "nope"), "unknown method 'nope'"),
        (lambda: ext.batched_eigh(torch.zeros(2, 40, 40), "syevj_batched"), "supports matrices up to 32 x 32"),
        (lambda: ext.batched_eigh(A[:, :30].half()), "expected float32 or float64"),
        (lambda: ext.batched_eigh(A[:, :30]), "expected a CUDA tensor, got one on cpu"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message) as caught:
            call()
        first_line = str(caught.value).splitlines()[0]
        assert first_line.startswith("tsv_fast._C."), first_line
        print(first_line)
    assert isinstance(ext.has_xsyev_batched(), bool)
    assert ext.cusolver_version() >= 11000 and ext.CUSOLVER_BUILD_VERSION >= 11000


# ------------------------------------------------------------------------------- setup.py
def load_setup(monkeypatch, **env):
    """Import setup.py as a module (without running setup()) under the given environment."""
    for name in ("TSV_FAST_SKIP_CUDA_BUILD", "TSV_FAST_FORCE_CUDA_BUILD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("tsv_fast_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_skip_switch(monkeypatch):
    setup = load_setup(monkeypatch, TSV_FAST_SKIP_CUDA_BUILD="1")
    kwargs, info = setup.plan_cuda_build()
    assert kwargs is None and info["built"] is False
    assert "TSV_FAST_SKIP_CUDA_BUILD=1" in info["reason"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_setup_skips_on_cpu_torch_and_force_fails(monkeypatch):
    setup = load_setup(monkeypatch)
    kwargs, info = setup.plan_cuda_build()
    assert kwargs is None and "CPU-only build" in info["reason"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSV_FAST_")}
    env["TSV_FAST_FORCE_CUDA_BUILD"] = "1"
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "TSV_FAST_FORCE_CUDA_BUILD=1 but tsv_fast._C cannot be built" in result.stderr
    assert "CPU-only build" in result.stderr


def test_setup_finds_cusolver_headers_in_wheel_layouts(monkeypatch, tmp_path):
    setup = load_setup(monkeypatch)
    # CUDA 13 wheels: nvidia/cu13/{include,lib}; only a versioned soname is shipped.
    cu13 = tmp_path / "site13" / "nvidia" / "cu13"
    (cu13 / "include").mkdir(parents=True)
    (cu13 / "lib").mkdir()
    for header in ("cusolverDn.h", "cublas_v2.h"):
        (cu13 / "include" / header).write_text("")
    (cu13 / "lib" / "libcusolver.so.12").write_text("")
    monkeypatch.setattr(setup, "_site_dirs", lambda: [str(tmp_path / "site13")])
    include_dirs, library_dirs, link_args = setup.find_cusolver(cuda_home=str(tmp_path / "no_toolkit"))
    assert include_dirs == [str(cu13 / "include")]
    assert library_dirs == [str(cu13 / "lib")]
    assert "-l:libcusolver.so.12" in link_args

    # CUDA 12 wheels: nvidia/cusolver and nvidia/cublas side by side.
    nv = tmp_path / "site12" / "nvidia"
    for pkg, header in (("cusolver", "cusolverDn.h"), ("cublas", "cublas_v2.h")):
        (nv / pkg / "include").mkdir(parents=True)
        (nv / pkg / "include" / header).write_text("")
    (nv / "cusolver" / "lib").mkdir()
    (nv / "cusolver" / "lib" / "libcusolver.so.11").write_text("")
    monkeypatch.setattr(setup, "_site_dirs", lambda: [str(tmp_path / "site12")])
    include_dirs, _, link_args = setup.find_cusolver(cuda_home=None)
    assert set(include_dirs) == {str(nv / "cusolver" / "include"), str(nv / "cublas" / "include")}
    assert "-l:libcusolver.so.11" in link_args

    monkeypatch.setattr(setup, "_site_dirs", lambda: [str(tmp_path / "empty")])
    assert setup.find_cusolver(cuda_home=None) is None
