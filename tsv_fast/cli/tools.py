"""``tsv-fast convert``, ``demo`` and ``version``."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .common import human_bytes, parse_size, peak_rss_bytes, run_command, summary


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A torch .pt/.bin (or any readable) checkpoint."),
    output: Path = typer.Argument(..., help="Output .safetensors file or folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Unpickle whole pickled modules. Runs code from the file: trusted files only."),
    max_shard_size: Optional[str] = typer.Option(None, help="Shard the output, e.g. 5GB."),
):
    """Convert a checkpoint (e.g. a pickled .pt of the TSV or task-arithmetic papers) to safetensors once."""
    def body():
        from ..io.sink import convert as convert_file

        started = time.perf_counter()
        out = convert_file(source, output, allow_pickle=allow_pickle, max_shard_bytes=parse_size(max_shard_size))
        summary(started, Path(out))

    run_command(body)



@app.command()
def demo(
    tasks: int = typer.Option(8, help="Number of synthetic fine-tunes."),
    layout: str = typer.Option("vit-b-32", help="Layer layout: vit-b-32, vit-b-16, vit-l-14, llama-7b-layer, tiny-vit."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Where to write the generated checkpoints. Default: a temporary folder, removed afterwards."),
    output: Path = typer.Option(Path("tsv-fast-demo") / "merged.safetensors", "--output", "-o", help="Where the merged model goes."),
    rows: int = typer.Option(20, help="Rows of the STI table to print (0: all)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Generate T synthetic fine-tunes (real layer shapes) one at a time, merge them from disk, print
    time, peak memory against the inputs, STI, and what TSV-C would store."""
    def body():
        from .. import synthetic
        from ..io.sink import SafetensorsSink
        from ..io.sources import open_checkpoint
        from .config import MergeJob
        from .merge import run_merge_command
        from .sti import print_sti_table

        started = time.perf_counter()
        synthetic.layout(layout)  # an unknown layout fails before anything is written
        temp = None
        if directory is None:
            temp = tempfile.TemporaryDirectory(prefix="tsv-fast-demo-")
            folder = Path(temp.name)
        else:
            folder = directory
            folder.mkdir(parents=True, exist_ok=True)
        try:
            typer.echo(f"generating {tasks} fine-tunes of layout {layout!r} in {folder}, one at a time")
            from tqdm.auto import tqdm

            paths = []
            for i in tqdm(range(tasks + 1), desc="writing", unit="file", disable=not progress):
                path = folder / ("pretrained.safetensors" if i == 0 else f"finetuned_{i - 1}.safetensors")
                sink = SafetensorsSink(path)  # streamed: one tensor in memory at a time
                try:
                    for key, tensor in synthetic.checkpoint(layout, None if i == 0 else i - 1):
                        sink.write(key, tensor)
                    sink.close({"synthetic": f"{layout}, {'pretrained' if i == 0 else f'fine-tune {i - 1}'}, seed 0"})
                except BaseException:
                    sink.abort()
                    raise
                paths.append(str(path))
            merge_started = time.perf_counter()
            out, rep = run_merge_command(MergeJob(paths[0], paths[1:], output=str(output)), quiet=True,
                                         progress=progress)
            merge_seconds = time.perf_counter() - merge_started
            pre = open_checkpoint(paths[0])
            per_layer = {key: rep.layers[key].sti for key in pre.keys() if key in rep.layers}  # checkpoint order
            typer.echo("\nSingular Task Interference per layer (from the merge's Grams):")
            print_sti_table(per_layer, limit=rows or None)
            inputs = sum(Path(p).stat().st_size for p in paths)
            typer.echo(f"\nmerged {tasks} models ({layout}) in {merge_seconds:.1f} s with backend {rep.backend}")
            typer.echo(f"inputs: {tasks + 1} checkpoints of {human_bytes(inputs / (tasks + 1))}, {human_bytes(inputs)} "
                       f"in all; peak memory {human_bytes(peak_rss_bytes())} ({peak_rss_bytes() / inputs:.0%} of the inputs)")
            stored, dense = tsvc_storage(pre, tasks)
            typer.echo(f"TSV-C of these tasks (tsv-fast compress) stores {stored / dense:.1%} of the dense task vectors: "
                       f"k(m+n+1) numbers per matrix and task instead of mn, 2/T = {2 / tasks:.1%} for square "
                       f"matrices, 1.25/T = {1.25 / tasks:.1%} for 4:1 ones")
            typer.echo(f"merged file: {out.resolve()}")
            summary(started, out)
        finally:
            if temp is not None:
                temp.cleanup()

    run_command(body)


def tsvc_storage(layout, num_tasks: int) -> tuple[int, int]:
    """(numbers TSV-C stores, numbers of the dense task vectors) for T tasks of ``layout`` with the
    default options: k(m + n + 1) per factored matrix and task, the whole delta for the other keys
    (the accounting of ``CompressedTasks.storage``, from the shapes)."""
    import math

    from ..options import Options, is_merged_as_matrix

    options, stored, dense = Options(), 0, 0
    for key in layout.keys():
        shape = layout.shape(key)
        numel = math.prod(shape)
        dense += num_tasks * numel
        if is_merged_as_matrix(key, shape, options.exclude):
            stored += num_tasks * options.rank(key, shape, num_tasks) * (sum(shape) + 1)
        elif layout.dtype(key).is_floating_point:
            stored += num_tasks * numel
    return stored, dense


@app.command()
def version():
    """Print the package version, torch's, and which backends are available (and why not)."""
    import torch

    from .. import __version__
    from ..backends import available_backends

    typer.echo(f"tsv_fast {__version__} (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    for name, reasons in available_backends().items():
        reasons = [r.removeprefix(f"{name}: ") for r in reasons]  # each reason names its backend
        typer.echo(f"  {name:<9} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
