"""`import tsv_fast` is light: no triton, no compiled extension, no CUDA initialisation."""
import subprocess
import sys


def test_import_is_light():
    code = ("import sys, torch, tsv_fast\n"
            "tsv_fast.fast_tsv_merge, tsv_fast.tsv_merge, tsv_fast.compress, tsv_fast.interference\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert 'tsv_fast._C' not in sys.modules, 'extension imported'\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
            "print(tsv_fast.__version__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.1.0"


def test_info_reports_backends_and_reasons():
    import json

    result = subprocess.run([sys.executable, "-m", "tsv_fast.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["backends"]["cpu"]["torch"] == "available"
    assert any("CUDA" in reason for reason in facts["backends"]["cpu"]["cusolver"])


def test_env_var_selects_the_default_backend(monkeypatch):
    import pytest

    from tsv_fast.backends import resolve_backend

    monkeypatch.setenv("TSV_FAST_BACKEND", "torch")
    assert resolve_backend(None, "cpu").name == "torch"
    monkeypatch.setenv("TSV_FAST_BACKEND", "cusolver")
    with pytest.raises(RuntimeError, match="backend 'cusolver' cannot run on cpu"):
        resolve_backend(None, "cpu")



def test_repo_kernels_folder_never_shadows_a_kernels_package(tmp_path):
    """From the clone root (`python -c`, `python -m pytest` put it on sys.path) `import kernels` must
    not find the repo's Triton folder: transformers >= 5 imports Hugging Face's `kernels` package."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("MARK = 'installed'\n")
    code = ("import kernels, tsv_fast.kernels.task_gram as op\n"
            "print(getattr(kernels, 'MARK', None), getattr(kernels, '__file__', None), op.__name__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # an installed `kernels` (here on PYTHONPATH, after the clone root that `python -c` puts first) wins
    got = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": str(site)})
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["installed", str(site / "kernels" / "__init__.py"), "tsv_fast.kernels.task_gram"]
    # without it, the repo folder is at most an empty namespace package, never a module with a file
    got = subprocess.run([sys.executable, "-S", "-c", "import kernels; print(kernels.__file__)"], cwd=root,
                         capture_output=True, text=True, timeout=120, env=env)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "None"
