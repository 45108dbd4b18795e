"""tsv_fast: fast, tested spectral model merging: TSV-M, TSV-C, STI, Iso-C and Iso-CTS.

The package reads as its data flow: ``io`` (checkpoint sources, PEFT adapters, TSV-C files, sinks)
-> ``engine`` (plan, memory-budgeted chunks of same-shape matrices, read-ahead) -> ``methods`` (what
each method makes of a chunk) -> ``backends`` (the linear algebra: torch, triton, cusolver); ``api``
holds the public functions, ``cli`` the ``tsv-fast`` command, ``reference`` the float64 twins.

Importing this package is light: it never compiles, never initialises CUDA and needs neither
triton nor the compiled extension; those load when a backend that uses them is asked for.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "merge": "tsv_fast.api",
    "fast_tsv_merge": "tsv_fast.api",
    "tsv_merge": "tsv_fast.api",
    "task_arithmetic": "tsv_fast.api",
    "compress": "tsv_fast.api",
    "interference": "tsv_fast.api",
    "lora_tsv_merge": "tsv_fast.api",
    "merge_compressed": "tsv_fast.api",
    "append_tasks": "tsv_fast.api",
    "Options": "tsv_fast.options",
    "Report": "tsv_fast.engine.report",
    "CompressedTasks": "tsv_fast.io.tsvc",
    "per_block": "tsv_fast.methods.sti",
    "get_method": "tsv_fast.methods",
    "available_backends": "tsv_fast.backends",
    "load_adapter": "tsv_fast.io.peft",
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
