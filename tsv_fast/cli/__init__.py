"""The ``tsv-fast`` command line, one module per command family:

``merge`` (full checkpoints or LoRA adapters, any merge method), ``tasks`` (compress / reconstruct
TSV-C libraries), ``sti`` (interference), ``tools`` (convert, demo, version), ``ranks`` (finalize, and
the three first under torchrun or as ``--shard`` parts). ``config`` reads merge
configs, ``common`` holds what they share. ``app`` is the console script's entry point.
"""
from . import merge, mergekit, ranks, sti, tasks, tools  # noqa: F401 - each registers its commands on app
from .app import app
from .tools import main

__all__ = ["app", "main"]
