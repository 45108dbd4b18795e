"""``tsv-fast convert``, ``demo`` and ``version``."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .common import parse_size, run_command, summary


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
):
    """Generate T synthetic fine-tunes (real layer shapes), merge them from disk, print time and STI."""
    def body():
        from .. import synthetic
        from ..io.sink import save_checkpoint
        from ..io.sources import open_checkpoint
        from .config import MergeJob
        from .merge import run_merge_command
        from .sti import print_sti_table

        started = time.perf_counter()
        temp = None
        if directory is None:
            temp = tempfile.TemporaryDirectory(prefix="tsv-fast-demo-")
            folder = Path(temp.name)
        else:
            folder = directory
            folder.mkdir(parents=True, exist_ok=True)
        try:
            typer.echo(f"generating {tasks} fine-tunes of layout {layout!r} in {folder}")
            pre, fts = synthetic.checkpoints(layout, tasks)
            from tqdm.auto import tqdm

            paths = []
            for i, ft in enumerate(tqdm([pre, *fts], desc="writing", unit="file")):
                name = "pretrained.safetensors" if i == 0 else f"finetuned_{i - 1}.safetensors"
                save_checkpoint(ft, folder / name)
                paths.append(str(folder / name))
            del pre, fts  # the merge reads from disk
            merge_started = time.perf_counter()
            output.parent.mkdir(parents=True, exist_ok=True)
            out, rep = run_merge_command(MergeJob(paths[0], paths[1:], output=str(output)), quiet=True)
            merge_seconds = time.perf_counter() - merge_started
            order = open_checkpoint(paths[0]).keys()  # the table follows the checkpoint's layer order
            per_layer = {key: rep.layers[key].sti for key in order if key in rep.layers}
            typer.echo("\nSingular Task Interference per layer (from the merge's Grams):")
            print_sti_table(per_layer, limit=rows or None)
            typer.echo(f"\nmerged {tasks} models ({layout}) in {merge_seconds:.1f} s with backend {rep.backend}")
            typer.echo(f"merged file: {out.resolve()}")
            summary(started, out)
        finally:
            if temp is not None:
                temp.cleanup()

    run_command(body)



@app.command()
def version():
    """Print the package version and the available backends."""
    from .. import __version__
    from ..backends import available_backends

    typer.echo(f"tsv_fast {__version__}")
    for name, reasons in available_backends().items():
        typer.echo(f"  {name}: {'available' if not reasons else '; '.join(reasons)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
