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
