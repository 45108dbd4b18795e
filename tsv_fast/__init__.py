"""tsv_fast: fast, tested Task Singular Vectors model merging (TSV-M, TSV-C, STI).

Importing this package is light: it never compiles, never initialises CUDA and needs neither
triton nor the compiled extension; those load when a backend that uses them is asked for.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "fast_tsv_merge": "tsv_fast.merge",
    "tsv_merge": "tsv_fast.merge",
    "task_arithmetic": "tsv_fast.merge",
    "Report": "tsv_fast.merge",
    "compress": "tsv_fast.tsvc",
    "CompressedTasks": "tsv_fast.tsvc",
    "interference": "tsv_fast.sti",
    "per_block": "tsv_fast.sti",
    "available_backends": "tsv_fast.backends",
    "lora_tsv_merge": "tsv_fast.lora",
    "load_adapter": "tsv_fast.lora",
}

__all__ = [*sorted(_EXPORTS), "reference", "__version__"]


def __getattr__(name: str):
    if name == "reference":
        return importlib.import_module("tsv_fast.reference")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tsv_fast' has no attribute {name!r}")


def __dir__():
    return __all__
