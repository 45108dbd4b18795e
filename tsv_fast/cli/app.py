"""The ``tsv-fast`` typer application; each command family registers itself from its module."""
from __future__ import annotations

import typer

from ..engine.heap import bound_heap_growth

app = typer.Typer(
    help=("Task Singular Vectors (TSV, CVPR 2025) model merging at bounded memory.\n\n"
          "Quick start:  tsv-fast demo\n\n"
          "Merge:  tsv-fast merge --base pretrained.safetensors ft_a.safetensors ft_b.safetensors -o merged.safetensors\n\n"
          "Inputs may be safetensors files, Hugging Face model folders (sharded or not) or torch .pt/.bin "
          "state dicts. Run `tsv-fast COMMAND --help` for each command's options."),
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, a scheduler's time limit) like Ctrl-C, so the sink removes its temporaries."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner): leave it
        pass


def _one_line_warnings() -> None:
    """Warnings as one line each (``warning: ...``), never the source line that raised them."""
    import sys
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show


@app.callback()
def _setup(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a failure (for bug reports).")) -> None:
    from . import common

    common.DEBUG = common.DEBUG or debug
    bound_heap_growth()
    _interrupt_on_sigterm()
    _one_line_warnings()


