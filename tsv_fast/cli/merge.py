"""``tsv-fast merge``: full checkpoints or LoRA adapters into one model, streamed to safetensors."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .common import (CliError, config_files, guard_outputs, local_inputs, lora_models, open_all, parse_overrides,
                     run_command, summary)
from .config import KEYS, MergeJob, load_config, typed_value
from .ranks import launched, parse_shard, rank_summary, write_model


@app.command()
def merge(
    models: Optional[list[Path]] = typer.Argument(None, help="Fine-tuned checkpoints (files or model folders), or PEFT LoRA adapter folders of the base."),
    base: Optional[Path] = typer.Option(None, "--base", "-b", help="The pretrained checkpoint all models were fine-tuned from."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output: a .safetensors file, or a folder (gets model.safetensors)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (base_model, models, merge_method, alpha, ...); flags override it."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="tsv-m | iso-c | iso-cts | ta. Default: tsv-m."),
    alpha: Optional[float] = typer.Option(None, help="Scale of the merged task vector: W = W_pre + alpha*M. Default: 1.0."),
    rank_fraction: Optional[float] = typer.Option(None, help="TSV per-task rank k = int(min(m,n) * fraction). Default: 1/T."),
    common_space_fraction: Optional[float] = typer.Option(None, help="iso-cts: share of the common subspace. Default: 0.8."),
    min_rank: Optional[int] = typer.Option(None, help="TSV: at least this many triplets per task (1 keeps layers with min(m,n) < T). Default: 0."),
    rank_override: Optional[list[str]] = typer.Option(None, help="TSV: PATTERN=K (a rank) or PATTERN=0.25 (a fraction) for keys matching the glob PATTERN (repeatable)."),
    exclude: Optional[list[str]] = typer.Option(None, help="2-D keys containing this text are averaged, not factored (repeatable). Default: text_projection."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype: float32 or float64. Default: float32."),
    out_dtype: Optional[str] = typer.Option(None, help="Output dtype for floating tensors (e.g. bfloat16). Default: the base model's."),
    device: Optional[str] = typer.Option(None, help="Where to compute: cpu, cuda, cuda:1. Default: cpu."),
    max_shard_size: Optional[str] = typer.Option(None, help="Split the output into shards of at most this size, e.g. 5GB (writes an index.json)."),
    backend: Optional[str] = typer.Option(None, help="auto | torch | triton | cusolver. Default: auto."),
    max_chunk_size: Optional[str] = typer.Option(None, help="Working-memory budget per chunk of same-shape layers. Default: 256MB."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow torch files that need unpickling (runs code from the file: trusted files only)."),
    report: Optional[Path] = typer.Option(None, help="Write a JSON report: per-layer rank k, conditioning and STI."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    exact: bool = typer.Option(False, "--exact", help="The authors' full-SVD route (one SVD per task, Procrustes by SVD) in the compute dtype: their numerics, about 2.5x slower. With --dtype float64 it writes float64 unless --out-dtype says otherwise."),
    missing_keys: Optional[str] = typer.Option(None, help="Keys some checkpoints lack: base (buffers and keys transformers ignores come from the base; others are refused), zero (a missing key is a zero task vector), error. Default: base."),
    copy_configs: Optional[bool] = typer.Option(None, "--copy-configs/--no-copy-configs", help="Copy config.json (dtype set to the output's), generation config and tokenizer files of a base model folder into a folder output. Default: copy."),
    as_adapter: bool = typer.Option(False, "--as-adapter", help="LoRA inputs: write the merged update as a PEFT LoRA adapter folder (-o DIR), not full weights."),
    max_rank: Optional[int] = typer.Option(None, help="--as-adapter: keep each module's top R singular triplets of the merged update (prints the energy kept)."),
    tasks: Optional[str] = typer.Option(None, help="A TSV-C library input: which stored tasks to merge, e.g. 0,2,5. Default: all."),
    shard: Optional[str] = typer.Option(None, help="Write only part I of N (0 <= I < N) of the output, for job arrays without a rendezvous; then `tsv-fast finalize OUTPUT`."),
):
    """Merge fine-tuned checkpoints (or PEFT LoRA adapters) into one model, streamed to safetensors.

    Example:  tsv-fast merge -b pre.safetensors ft1.safetensors ft2.safetensors -o merged.safetensors

    Methods:  --method tsv-m (default, TSV-M), iso-c, iso-cts (Iso-C / Iso-CTS), ta (Task Arithmetic)

    LoRA:  tsv-fast merge -b llama-7b/ lora-math/ lora-code/ -o merged/   (adapter folders with
    adapter_config.json; their SVDs come from the low-rank factors, never from dense deltas);
    add --as-adapter [--max-rank R] to write a merged LoRA adapter folder instead

    TSV-C:  tsv-fast merge -b pre.safetensors tasks.tsvc --tasks 0,2,5 -o merged.safetensors   (merges
    stored tasks from their factors, k = min(stored k, the rank rule) per task)

    Or with a YAML config (keys: base_model, models, merge_method, parameters, alpha, rank_fraction,
    exclude, dtype, out_dtype, device, max_shard_size, backend, output, exact, missing_keys,
    copy_configs, as_adapter, max_rank, tasks):  tsv-fast merge -c merge.yaml

    Models may be paths or Hugging Face model ids (org/name or org/name@revision, fetched into the
    hub cache; HF_HUB_OFFLINE=1 reads the cache only); a path that exists always wins.

    Several processes:  torchrun --nproc-per-node 8 -m tsv_fast merge ...  (one rank per GPU or core),
    or N independent jobs  tsv-fast merge ... --shard I/N  then  tsv-fast finalize OUTPUT
    """
    def body():
        job = load_config(config) if config else MergeJob()
        if models:
            job.models, job.weights = [str(m) for m in models], None
        job.base_model = str(base) if base else job.base_model
        job.output = str(output) if output else job.output
        flags = {"merge_method": method, "alpha": alpha, "rank_fraction": rank_fraction, "min_rank": min_rank,
                 "rank_overrides": parse_overrides(rank_override) if rank_override else None,
                 "common_space_fraction": common_space_fraction, "exclude": list(exclude) if exclude else None,
                 "dtype": dtype, "out_dtype": out_dtype, "device": device, "max_shard_size": max_shard_size,
                 "backend": backend, "max_chunk_size": max_chunk_size, "allow_pickle": allow_pickle or None,
                 "exact": exact or None, "missing_keys": missing_keys, "copy_configs": copy_configs,
                 "as_adapter": as_adapter or None, "max_rank": max_rank, "tasks": parse_tasks(tasks) if tasks else None}
        for key, value in flags.items():
            if value is not None:
                job.values[key] = typed_value(f"--{key.replace('_', '-')}", KEYS[key], value)
        if not job.base_model:
            raise CliError("no base model: pass --base PATH (or base_model: in the config)")
        if not job.output:
            raise CliError("no output: pass --output PATH (or output: in the config)")
        if not job.models:
            raise CliError("no fine-tuned models given (pass paths, or models: in the config)")
        part = parse_shard(shard)
        if part is not None and report is not None:
            raise CliError("--report needs the whole merge; a --shard part sees only its own layers")
        with launched(job.get("device")) as (dist, rank_device):
            if dist is not None and rank_device is not None:
                job.values["device"] = rank_device
            return run_merge_command(job, report_path=report, progress=progress, dist=dist, shard=part)

    run_command(body)


def parse_tasks(text: str) -> list[int]:
    """'0,2,5' -> [0, 2, 5]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise CliError(f"--tasks {text!r}: expected task numbers separated by commas, e.g. 0,2,5") from None


def job_options(job: MergeJob, progress: bool):
    """The engine's Options and the method of a merge job."""
    from ..methods import get_method
    from ..options import Options

    name = job.get("merge_method", "tsv-m")
    fraction = job.get("common_space_fraction")
    if fraction is not None and name != "iso-cts":
        raise CliError(f"common_space_fraction is a parameter of iso-cts, not of {name}")
    exact, dtype = job.get("exact", False), job.get("dtype", "float32")
    # the float64 oracle keeps its digits unless told otherwise
    out_dtype = job.get("out_dtype") or ("float64" if exact and dtype == "float64" else None)
    options = Options(alpha=job.get("alpha", 1.0), rank_fraction=job.get("rank_fraction"),
                      min_rank=job.get("min_rank", 0), rank_overrides=job.get("rank_overrides"),
                      exclude=tuple(job.get("exclude", ["text_projection"])), compute_dtype=dtype,
                      backend=job.get("backend"), device=job.get("device"),
                      max_chunk_bytes=job.get("max_chunk_size", 256 << 20), progress=progress, exact=exact,
                      out_dtype=out_dtype, missing_keys=job.get("missing_keys", "base"))
    return options, get_method(name, **({"common_space_fraction": fraction} if fraction is not None else {}))


def run_merge_command(job: MergeJob, *, report_path: Optional[Path] = None, progress: bool = True,
                      quiet: bool = False, dist=None, shard=None):
    """The merge behind ``tsv-fast merge`` and ``tsv-fast demo``: returns (output path, Report).
    ``dist``: this rank of a torchrun job (engine.distributed); ``shard``: one --shard part."""
    started = time.perf_counter()
    # paths and model ids first, then the output guard: both before torch loads or any work
    names = [job.base_model, *job.models]
    job.base_model, *job.models = local_inputs(names)
    guard_outputs([job.base_model, *job.models], job.output, report_path)
    options, method = job_options(job, progress)  # checks the device too

    from .. import __version__
    from ..engine.sources import DenseTasks
    from ..io.sources import checkpoint_nbytes, open_checkpoint

    allow_pickle = job.get("allow_pickle", False)
    lora = lora_models(job.models)
    library = len(job.models) == 1 and is_library(job.models[0])
    as_adapter, max_rank, tasks = job.get("as_adapter", False), job.get("max_rank"), job.get("tasks")
    if lora and options.exact:
        raise CliError("--exact is for full checkpoints: the SVD of a LoRA update is already exact (from its factors)")
    if max_rank is not None and not as_adapter:
        raise CliError("--max-rank truncates a merged adapter: add --as-adapter")
    if max_rank is not None and max_rank < 1:
        raise CliError(f"--max-rank must be at least 1, got {max_rank}")
    if as_adapter and not lora:
        raise CliError("--as-adapter writes a merged LoRA adapter; it needs PEFT LoRA adapter folders as inputs")
    if as_adapter and job.output.endswith(".safetensors"):
        raise CliError(f"--as-adapter writes a folder (adapter_config.json + adapter_model.safetensors); "
                       f"-o {job.output} is a file name")
    if not library and any(is_library(m) for m in job.models):
        raise CliError("a TSV-C library is merged on its own: pass one .tsvc file (and --tasks to pick its tasks)")
    if tasks is not None and not library:
        raise CliError("--tasks picks stored tasks of a TSV-C library (one .tsvc input)")
    if (lora or library) and job.weights is not None:
        raise CliError("per-model weights are not supported for LoRA adapters or TSV-C libraries")
    if lora:
        from ..engine.adapters import AdapterTasks
        from ..io.peft import load_adapter

        pre = open_checkpoint(job.base_model, allow_pickle=allow_pickle)
        source = AdapterTasks(pre, [load_adapter(m) for m in job.models])
    elif library:
        from ..engine.tsvc import LibraryTasks
        from ..io.tsvc import TsvcLibrary

        if options.exact:
            raise CliError("--exact is for full checkpoints: a TSV-C library stores factors already")
        pre = open_checkpoint(job.base_model, allow_pickle=allow_pickle)
        source = LibraryTasks(pre, TsvcLibrary(job.models[0]), tasks)
    else:
        pre, fts = open_all(Path(job.base_model), [Path(m) for m in job.models], allow_pickle)
        source = DenseTasks(pre, fts, job.weights)
    out_dtype = options.out_dtype
    dtype = str(out_dtype or _main_dtype(pre)).replace("torch.", "")
    extra = {"rank_rule": "k = int(min(m, n) * rank_fraction) per task, rank_fraction = 1/T by default",
             "T": str(source.num_tasks), "dtype": dtype,
             "exclude": ",".join(options.exclude), "package": f"tsv_fast {__version__}",
             "base_model": _name(names[0]), "models": json.dumps([_name(m) for m in names[1:]]),
             **({"weights": json.dumps(job.weights)} if job.weights else {})}
    quiet = quiet or (dist is not None and dist.rank > 0)  # rank 0 speaks for the run
    if as_adapter and (dist is not None or shard is not None):
        raise CliError("--as-adapter writes one adapter from one process; run it without torchrun or --shard")
    if as_adapter:  # a PEFT adapter folder: no model config or tokenizer goes into it
        from ..io.peft_out import AdapterSink

        sink = AdapterSink(source.adapters, max_rank=max_rank, dtype=out_dtype)
        extra["dtype"] = str(sink.dtype).replace("torch.", "")
    else:
        sink_args = dict(
            max_shard_bytes=job.get("max_shard_size"), inputs=[job.base_model, *job.models],
            expected_bytes=checkpoint_nbytes(pre, out_dtype), out_dtype=out_dtype, extra_metadata=extra,
            extra_files=config_files(job.base_model, job.output, dtype, job.get("copy_configs", True)))
    if not quiet:
        kind = "LoRA adapters" if lora else f"tasks of {job.models[0]}" if library else "models"
        into = f"a LoRA adapter at {job.output}" if as_adapter else job.output
        where = (f" on {dist.world} ranks" if dist is not None else
                 f" (part {shard.index} of {shard.count})" if shard is not None else "")
        typer.echo(f"merging {source.num_tasks} {kind} into {into} with {method.name}{where} (base {pre.name})")
    if as_adapter:
        from ..engine.run import run

        out_path, rep = run(source, method, options, sink, compute_sti=method.name == "tsv-m", metadata=extra,
                            low_rank=True)
    else:
        out_path, rep = write_model(job.output, sink_args, source, method, options, dist=dist, shard=shard,
                                    compute_sti=method.name == "tsv-m")
    if as_adapter:
        from ..io.peft_out import energy_summary

        adapter = out_path
        out_path = adapter.save(job.output, inputs=[job.base_model, *job.models])
        if not quiet:
            typer.echo(f"adapter ranks {min(adapter.ranks.values(), default=0)}…{max(adapter.ranks.values(), default=0)} "
                       f"over {len(adapter.ranks)} modules; {energy_summary(adapter)}")
    if report_path is not None and (dist is None or dist.rank == 0):
        write_report(report_path, rep, inputs=[job.base_model, *job.models])
    if not quiet:
        summary(started, Path(out_path))
        rank_summary(rep)
    return Path(out_path), rep


def is_library(path: str) -> bool:
    """A TSV-C file (a safetensors file whose metadata holds the 'tsv_c' header)."""
    from ..io.outputs import safetensors_metadata

    return Path(path).is_file() and "tsv_c" in safetensors_metadata(Path(path))


def _name(model: str) -> str:
    """How an input is named in the output's metadata: a model id as written, a path by its name."""
    return model if not Path(model).exists() else Path(model).name


def _main_dtype(ckpt) -> object:
    counts: dict = {}
    for key in ckpt.keys():
        counts[ckpt.dtype(key)] = counts.get(ckpt.dtype(key), 0) + 1
    return max(counts, key=counts.get)


def write_report(path: Path, rep, inputs=()) -> None:
    from ..io.outputs import write_file

    layers = {key: {"shape": list(layer.shape), "k": layer.k, "kappa_u": _finite(layer.kappa_u),
                    "kappa_v": _finite(layer.kappa_v), "rank_u": layer.rank_u, "rank_v": layer.rank_v,
                    "sti": _finite(layer.sti)} for key, layer in rep.layers.items()}
    data = {"method": rep.method, "backend": rep.backend, "num_tasks": rep.num_tasks, "seconds": rep.seconds,
            "layers": layers, "averaged": rep.averaged, "zero_rank": rep.zero_rank, "zero_delta": rep.zero_delta,
            **({"ranks": rep.ranks} if rep.ranks else {})}
    write_file(path, json.dumps(data, indent=2), inputs=inputs, what="report")


def _finite(x: float):
    return x if math.isfinite(x) else None
