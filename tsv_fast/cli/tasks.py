"""``tsv-fast compress`` (TSV-C task libraries) and ``tsv-fast reconstruct``."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .common import (CliError, check_device, config_files, guard_outputs, human_bytes, local_inputs, open_tasks,
                     parse_dtype_option, parse_overrides, run_command, summary)


@app.command()
def compress(
    models: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints or PEFT LoRA adapter folders of the base (with --append: the tasks to add)."),
    base: Path = typer.Option(..., "--base", "-b", help="The pretrained checkpoint."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The TSV-C file to write (e.g. tasks.tsvc). With --append: default the library itself."),
    append: Optional[Path] = typer.Option(None, "--append", help="Add the models as new tasks to this TSV-C library, at its ranks; the stored tasks are copied, not recomputed."),
    rank_fraction: Optional[float] = typer.Option(None, help="Per-task rank k = int(min(m,n) * fraction). Default: 1/T."),
    min_rank: int = typer.Option(0, help="At least this many triplets per task (1 keeps layers with min(m,n) < T)."),
    rank_override: Optional[list[str]] = typer.Option(None, help="PATTERN=K (a rank) or PATTERN=0.25 (a fraction) for keys matching the glob PATTERN (repeatable)."),
    exclude: Optional[list[str]] = typer.Option(None, help="2-D keys containing this text are stored dense. Default: text_projection."),
    storage_dtype: Optional[str] = typer.Option(None, help="dtype of the stored factors (float32, bfloat16, float16). Default: float32."),
    device: Optional[str] = typer.Option(None, help="Where to compute. Default: cpu."),
    backend: Optional[str] = typer.Option(None, help="auto | torch | triton | cusolver."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled torch files (trusted files only)."),
    exact: bool = typer.Option(False, "--exact", help="Factors from full SVDs (the authors' route) instead of the float64 Gram route."),
    missing_keys: str = typer.Option("base", help="Keys some checkpoints lack: base, zero or error (as in merge)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """TSV-C: each task's top-k singular triplets per layer in one file: k(m+n+1) numbers per matrix
    and task instead of mn, about 2/T of the task vectors for square matrices (1.25/T for 4:1).

    Example:  tsv-fast compress -b pre.safetensors ft*.safetensors -o tasks.tsvc

    Add a task:  tsv-fast compress --append tasks.tsvc -b pre.safetensors ft_new.safetensors
    """
    def body():
        started = time.perf_counter()
        target = output or append
        if target is None:
            raise CliError("no output: pass --output PATH (or --append LIBRARY)")
        if append is not None:
            fixed = [name for name, value in (("--rank-fraction", rank_fraction), ("--min-rank", min_rank or None),
                                              ("--rank-override", rank_override), ("--exclude", exclude),
                                              ("--storage-dtype", storage_dtype), ("--exact", exact or None))
                     if value is not None]
            if fixed:
                raise CliError(f"--append follows the library's ranks, exclude patterns and storage dtype; "
                               f"remove {', '.join(fixed)}")
        inputs = local_inputs([base, *models])  # paths and model ids, then the output, before any work
        guard_outputs(inputs, target)
        check_device(device)
        overrides = parse_overrides(rank_override) if rank_override else None

        from ..api import append_tasks
        from ..api import compress as tsv_compress
        from ..io.tsvc import save_compressed

        from . import ranks

        pre, tasks = open_tasks(Path(inputs[0]), [Path(m) for m in inputs[1:]], allow_pickle)
        if append is not None:
            storage = append_tasks(append, pre, tasks, output=target, names=[m.name for m in models],
                                   backend=backend, device=device, progress=progress, missing_keys=missing_keys)
        else:
            with ranks.launched(device) as (dist, rank_device):  # torchrun: the layers split over the ranks
                settings = dict(rank_fraction=rank_fraction, min_rank=min_rank, rank_overrides=overrides,
                                exclude=tuple(exclude) if exclude else ("text_projection",), backend=backend,
                                device=rank_device, progress=progress, exact=exact, missing_keys=missing_keys)
                storage_type = parse_dtype_option(storage_dtype or "float32")
                packed = (tsv_compress(pre, tasks, storage_dtype=storage_type, **settings) if dist is None else
                          ranks.compress(dist, pre, tasks, storage_type, **settings))
            if packed is None:  # another rank than 0: rank 0 writes the gathered library
                return
            packed.metadata.update({"base_model": base.name, "models": json.dumps([m.name for m in models])})
            storage = save_compressed(target, packed, inputs=inputs)
        typer.echo(f"stored {storage['stored_numbers']:,} numbers for {len(tasks)} "
                   f"{'new ' if append is not None else ''}tasks instead of "
                   f"{storage['dense_numbers']:,} ({storage['ratio']:.1%}); file {human_bytes(storage['file_bytes'])} "
                   f"vs {human_bytes(storage['dense_bytes'])} of dense task vectors")
        summary(started, target)

    run_command(body)


@app.command()
def reconstruct(
    compressed: Path = typer.Argument(..., help="A TSV-C file written by `tsv-fast compress`."),
    task: int = typer.Option(..., "--task", "-t", help="Which task to rebuild (0-based, in the order given to compress)."),
    base: Optional[Path] = typer.Option(None, "--base", "-b", help="Pretrained checkpoint; without it the task vector is written."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .safetensors file or folder."),
    out_dtype: Optional[str] = typer.Option(None, help="Output dtype for floating tensors. Default: the original's."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled base checkpoint (trusted files only)."),
    copy_configs: bool = typer.Option(True, "--copy-configs/--no-copy-configs", help="Copy config.json (dtype set to the output's), generation config and tokenizer files of a base model folder into a folder output."),
):
    """Rebuild one task's model from a TSV-C file: W_pre + U_i diag(s_i) V_i^T per layer."""
    def body():
        started = time.perf_counter()
        local = local_inputs([compressed, *([base] if base is not None else [])])
        guard_outputs(local, output)

        from ..io.sink import SafetensorsSink
        from ..io.sources import open_checkpoint
        from ..io.tsvc import load_compressed

        packed = load_compressed(compressed)
        pre = open_checkpoint(local[1], allow_pickle=allow_pickle) if base is not None else None
        weights = packed.reconstruct(task, pre)
        dtype = parse_dtype_option(out_dtype)
        main = dtype or Counter(packed.dtypes.values()).most_common(1)[0][0]
        files = config_files(local[1], output, str(main).removeprefix("torch."), copy_configs) if base else {}
        sink = SafetensorsSink(output, inputs=local, out_dtype=dtype, extra_files=files)
        try:
            for key, tensor in weights.items():
                sink.write(key, tensor)
            sink.close({"method": "tsv-c reconstruct", "task": str(task), "source": compressed.name,
                        "output": "weights" if base else "task_vector"})
        except BaseException:
            sink.abort()
            raise
        summary(started, output)

    run_command(body)


