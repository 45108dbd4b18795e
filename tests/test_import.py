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
