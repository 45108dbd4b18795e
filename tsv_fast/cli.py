"""The ``tsv-fast`` command line: merge, compress, reconstruct, interference, convert, demo.

Every command streams checkpoints from disk (safetensors files, Hugging Face folders, torch
``.pt``/``.bin`` state dicts) and ends with a one-line summary: wall time, peak memory, output size.
"""
from __future__ import annotations

import csv
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help=("Task Singular Vectors (TSV, CVPR 2025) model merging at bounded memory.\n\n"
          "Quick start:  tsv-fast demo\n\n"
          "Merge:  tsv-fast merge --base pretrained.safetensors ft_a.safetensors ft_b.safetensors -o merged.safetensors\n\n"
          "Inputs may be safetensors files, Hugging Face model folders (sharded or not) or torch .pt/.bin "
          "state dicts. Run `tsv-fast COMMAND --help` for each command's options."),
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# Keys a merge config (YAML) may hold, in the spirit of mergekit.
CONFIG_KEYS = {"base_model", "models", "alpha", "rank_fraction", "exclude", "dtype", "out_dtype", "device",
               "max_shard_size", "backend", "output", "max_chunk_size", "allow_pickle", "parameters", "exact"}


#: Allocations at least this large get their own memory map (glibc), see bound_heap_growth.
MMAP_THRESHOLD = 4 << 20


def bound_heap_growth() -> None:
    """Serve large tensors from fresh memory maps, returned to the OS as soon as they are freed.

    glibc raises its mmap threshold up to 32 MiB as large blocks are freed, after which the
    9-75 MiB layer slices of a merge come from the heap, which fragments: a ViT-B/32 merge of 20
    models peaked at 818 MiB this way and at ~550 MiB with the threshold fixed at 4 MiB (measured).
    An explicit MALLOC_MMAP_THRESHOLD_ in the environment wins.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, a scheduler's time limit) like Ctrl-C, so the sink removes its temporaries."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner): leave it
        pass


@app.callback()
def _setup() -> None:
    bound_heap_growth()
    _interrupt_on_sigterm()


class CliError(Exception):
    """A user-facing error: printed without a traceback."""


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def parse_size(text: str | int | None) -> int | None:
    """'5GB', '500MB', '2GiB', '1048576' -> bytes (None, '' and '0' mean no limit)."""
    if text is None or text == "" or text == 0:
        return None
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    if unit not in units or not number:
        raise CliError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    value = int(float(number) * units[unit])
    return value or None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    On Linux VmHWM of /proc/self/status: ru_maxrss survives fork and exec, so a child started by a
    large parent would report the parent's size. Elsewhere getrusage (macOS reports bytes, others KiB).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def path_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        return sum((path.parent / name).stat().st_size for name in set(index["weight_map"].values()))
    return path.stat().st_size if path.exists() else 0


def summary(started: float, output: Path | None) -> None:
    parts = [f"done in {time.perf_counter() - started:.1f} s", f"peak memory {human_bytes(peak_rss_bytes())}"]
    if output is not None:
        parts.append(f"output {human_bytes(path_size(output))} at {output}")
    typer.echo(" | ".join(parts))


def _fail(exc: BaseException) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1)


def _run(body):
    """Run a command body; user errors print one line, Ctrl-C says that nothing was written."""
    try:
        return body()
    except KeyboardInterrupt:
        typer.secho("interrupted: no output was written (temporary files removed)", err=True)
        raise typer.Exit(130)
    except (CliError, ValueError, FileNotFoundError, OSError, RuntimeError, TypeError) as exc:
        if os.environ.get("TSV_FAST_DEBUG"):  # the full traceback, for bug reports
            raise
        _fail(exc)


def _lora_models(models: list) -> bool:
    """True when every model is a PEFT LoRA adapter; an error when adapters and checkpoints mix."""
    from .lora import is_adapter

    if not models:
        raise CliError("no fine-tuned models given (pass paths, or `models:` in the config)")
    adapters = [str(m) for m in models if is_adapter(m)]
    if adapters and len(adapters) != len(models):
        others = [str(m) for m in models if not is_adapter(m)]
        raise CliError(f"the models mix LoRA adapters ({adapters[0]}, ...) and full checkpoints ({others[0]}, ...); "
                       "merge one kind at a time")
    return bool(adapters)


def _open_all(base: Optional[Path], models: list[Path], allow_pickle: bool):
    from .io import open_checkpoint

    if _lora_models(models):
        raise CliError(f"{models[0]} is a LoRA adapter: `tsv-fast merge` takes adapters; this command needs "
                       "full checkpoints")
    pre = open_checkpoint(base, allow_pickle=allow_pickle) if base is not None else None
    return pre, [open_checkpoint(m, allow_pickle=allow_pickle) for m in models]


def _dtype(name: Optional[str]):
    from .io import parse_dtype

    return parse_dtype(name) if name else None


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------
def load_config(path: Path) -> dict:
    """A merge config: YAML with the keys in CONFIG_KEYS; model entries are paths or {model: path}."""
    import yaml

    if not path.is_file():
        raise CliError(f"config not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise CliError(f"{path}: expected a mapping of options at the top level")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise CliError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    config.update(config.pop("parameters", None) or {})
    models = []
    for entry in config.get("models") or []:
        models.append(entry["model"] if isinstance(entry, dict) else entry)
    config["models"] = models
    # Relative paths in a config are relative to the config file.
    def resolve(p):
        return p if p is None or Path(p).is_absolute() else str(path.parent / p)
    config["models"] = [resolve(m) for m in config["models"]]
    for key in ("base_model", "output"):
        if config.get(key) is not None:
            config[key] = resolve(config[key])
    if isinstance(config.get("exclude"), str):
        config["exclude"] = [config["exclude"]]
    return config


@app.command()
def merge(
    models: Optional[list[Path]] = typer.Argument(None, help="Fine-tuned checkpoints (files or model folders), or PEFT LoRA adapter folders of the base."),
    base: Optional[Path] = typer.Option(None, "--base", "-b", help="The pretrained checkpoint all models were fine-tuned from."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output: a .safetensors file, or a folder (gets model.safetensors)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (base_model, models, alpha, ...); flags override it."),
    alpha: Optional[float] = typer.Option(None, help="Scale of the merged task vector: W = W_pre + alpha*M. Default: 1.0."),
    rank_fraction: Optional[float] = typer.Option(None, help="Per-task rank k = int(min(m,n) * fraction). Default: 1/T."),
    exclude: Optional[list[str]] = typer.Option(None, help="2-D keys containing this text are averaged, not TSV-merged (repeatable). Default: text_projection."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype: float32 or float64. Default: float32."),
    out_dtype: Optional[str] = typer.Option(None, help="Output dtype for floating tensors (e.g. bfloat16). Default: the base model's."),
    device: Optional[str] = typer.Option(None, help="Where to compute: cpu, cuda, cuda:1. Default: cpu."),
    max_shard_size: Optional[str] = typer.Option(None, help="Split the output into shards of at most this size, e.g. 5GB (writes an index.json)."),
    backend: Optional[str] = typer.Option(None, help="auto | torch | triton | cusolver. Default: auto."),
    max_chunk_size: Optional[str] = typer.Option(None, help="Working-memory budget per chunk of same-shape layers. Default: 256MB."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow torch files that need unpickling (runs code from the file: trusted files only)."),
    report: Optional[Path] = typer.Option(None, help="Write a JSON report: per-layer rank k, conditioning and STI."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    exact: bool = typer.Option(False, "--exact", help="The authors' full-SVD route (one SVD per task, Procrustes by SVD) in the compute dtype: their numerics, about 2.5x slower."),
):
    """TSV-M merge of fine-tuned checkpoints (or PEFT LoRA adapters) into one model, streamed to safetensors.

    Example:  tsv-fast merge -b pre.safetensors ft1.safetensors ft2.safetensors -o merged.safetensors

    LoRA:  tsv-fast merge -b llama-7b/ lora-math/ lora-code/ -o merged/   (adapter folders with
    adapter_config.json; their SVDs come from the low-rank factors, never from dense deltas)

    Or with a YAML config (keys: base_model, models, alpha, rank_fraction, exclude, dtype, out_dtype,
    device, max_shard_size, backend, output, exact):  tsv-fast merge -c merge.yaml
    """
    def body():
        cfg = load_config(config) if config else {}
        opts = {
            "models": [str(m) for m in models] if models else cfg.get("models", []),
            "base_model": str(base) if base else cfg.get("base_model"),
            "output": str(output) if output else cfg.get("output"),
            "alpha": alpha if alpha is not None else cfg.get("alpha", 1.0),
            "rank_fraction": rank_fraction if rank_fraction is not None else cfg.get("rank_fraction"),
            "exclude": list(exclude) if exclude else cfg.get("exclude", ["text_projection"]),
            "dtype": dtype or cfg.get("dtype", "float32"),
            "out_dtype": out_dtype or cfg.get("out_dtype"),
            "device": device or cfg.get("device"),
            "max_shard_size": max_shard_size or cfg.get("max_shard_size"),
            "backend": backend or cfg.get("backend"),
            "max_chunk_size": max_chunk_size or cfg.get("max_chunk_size", "256MB"),
            "allow_pickle": allow_pickle or bool(cfg.get("allow_pickle", False)),
            "exact": exact or bool(cfg.get("exact", False)),
        }
        if not opts["base_model"]:
            raise CliError("no base model: pass --base PATH (or base_model: in the config)")
        if not opts["output"]:
            raise CliError("no output: pass --output PATH (or output: in the config)")
        return run_merge_command(opts, report_path=report, progress=progress)

    _run(body)


def run_merge_command(opts: dict, *, report_path: Optional[Path] = None,
                      progress: bool = True, quiet: bool = False):
    """The merge behind ``tsv-fast merge`` and ``tsv-fast demo``: returns (output path, Report)."""
    from . import __version__
    from .io import SafetensorsSink, checkpoint_nbytes
    from .merge import Options, run_merge

    started = time.perf_counter()
    lora = _lora_models(opts["models"])
    if lora and opts.get("exact"):
        raise CliError("--exact is for full checkpoints: the SVD of a LoRA update is already exact (from its factors)")
    if lora:
        from .io import open_checkpoint

        pre, fts = open_checkpoint(opts["base_model"], allow_pickle=opts["allow_pickle"]), list(opts["models"])
    else:
        pre, fts = _open_all(Path(opts["base_model"]), [Path(m) for m in opts["models"]], opts["allow_pickle"])
    options = Options(rank_fraction=opts["rank_fraction"], exclude=tuple(opts["exclude"]),
                      compute_dtype=_dtype(opts["dtype"]), backend=opts["backend"], device=opts["device"],
                      max_chunk_bytes=parse_size(opts["max_chunk_size"]) or (256 << 20), progress=progress,
                      exact=bool(opts.get("exact", False)))
    out_dtype = _dtype(opts["out_dtype"])
    sink = SafetensorsSink(
        opts["output"], max_shard_bytes=parse_size(opts["max_shard_size"]),
        inputs=[opts["base_model"], *opts["models"]], expected_bytes=checkpoint_nbytes(pre, out_dtype),
        out_dtype=out_dtype,
        extra_metadata={"rank_rule": "k = int(min(m, n) * rank_fraction) per task, rank_fraction = 1/T by default",
                        "T": str(len(fts)), "dtype": str(out_dtype or _main_dtype(pre)).replace("torch.", ""),
                        "exclude": ",".join(opts["exclude"]), "package": f"tsv_fast {__version__}",
                        "base_model": Path(opts["base_model"]).name,
                        "models": json.dumps([Path(m).name for m in opts["models"]])})
    if not quiet:
        kind = "LoRA adapters" if lora else "models"
        typer.echo(f"merging {len(fts)} {kind} into {opts['output']} (base {pre.name})")
    if lora:
        from .lora import lora_tsv_merge

        out_path, rep = lora_tsv_merge(pre, fts, alpha=float(opts["alpha"]), rank_fraction=options.rank_fraction,
                                       exclude=options.exclude, backend=options.backend, device=options.device,
                                       compute_dtype=options.compute_dtype, sink=sink, progress=progress,
                                       return_report=True)
    else:
        out_path, rep = run_merge(pre, fts, options, alpha=float(opts["alpha"]), sink=sink, compute_sti=True)
    if report_path is not None:
        write_report(report_path, rep)
    if not quiet:
        summary(started, Path(out_path))
    return Path(out_path), rep


def _main_dtype(ckpt) -> object:
    counts: dict = {}
    for key in ckpt.keys():
        counts[ckpt.dtype(key)] = counts.get(ckpt.dtype(key), 0) + 1
    return max(counts, key=counts.get)


def write_report(path: Path, rep) -> None:
    layers = {key: {"shape": list(layer.shape), "k": layer.k, "kappa_u": _finite(layer.kappa_u),
                    "kappa_v": _finite(layer.kappa_v), "rank_u": layer.rank_u, "rank_v": layer.rank_v,
                    "sti": _finite(layer.sti)} for key, layer in rep.layers.items()}
    data = {"backend": rep.backend, "num_tasks": rep.num_tasks, "seconds": rep.seconds, "layers": layers,
            "averaged": rep.averaged, "zero_rank": rep.zero_rank, "zero_delta": rep.zero_delta}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _finite(x: float):
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------
# compress / reconstruct
# ------------------------------------------------------------------------------------------------
@app.command()
def compress(
    models: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints."),
    base: Path = typer.Option(..., "--base", "-b", help="The pretrained checkpoint."),
    output: Path = typer.Option(..., "--output", "-o", help="The TSV-C file to write (e.g. tasks.tsvc.safetensors)."),
    rank_fraction: Optional[float] = typer.Option(None, help="Per-task rank k = int(min(m,n) * fraction). Default: 1/T."),
    exclude: Optional[list[str]] = typer.Option(None, help="2-D keys containing this text are stored dense. Default: text_projection."),
    storage_dtype: str = typer.Option("float32", help="dtype of the stored factors (float32, bfloat16, float16)."),
    device: Optional[str] = typer.Option(None, help="Where to compute. Default: cpu."),
    backend: Optional[str] = typer.Option(None, help="auto | torch | triton | cusolver."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled torch files (trusted files only)."),
    exact: bool = typer.Option(False, "--exact", help="Factors from full SVDs (the authors' route) instead of the float64 Gram route."),
):
    """TSV-C: keep each task's top-k singular vectors per layer in one file (about 1/T of the task vectors)."""
    def body():
        from .io import save_compressed
        from .tsvc import compress as tsv_compress

        started = time.perf_counter()
        pre, fts = _open_all(base, list(models), allow_pickle)
        if output.resolve() in {Path(p).resolve() for p in [base, *models]}:
            raise CliError(f"output {output} is one of the inputs")
        packed = tsv_compress(pre, fts, rank_fraction=rank_fraction,
                              exclude=tuple(exclude) if exclude else ("text_projection",),
                              backend=backend or "auto", device=device, storage_dtype=_dtype(storage_dtype),
                              progress=True, exact=exact)
        packed.metadata.update({"base_model": base.name, "models": json.dumps([m.name for m in models])})
        storage = save_compressed(output, packed)
        typer.echo(f"stored {storage['stored_numbers']:,} numbers for {len(fts)} tasks instead of "
                   f"{storage['dense_numbers']:,} ({storage['ratio']:.1%}); file {human_bytes(storage['file_bytes'])} "
                   f"vs {human_bytes(storage['dense_bytes'])} of dense task vectors")
        summary(started, output)

    _run(body)


@app.command()
def reconstruct(
    compressed: Path = typer.Argument(..., help="A TSV-C file written by `tsv-fast compress`."),
    task: int = typer.Option(..., "--task", "-t", help="Which task to rebuild (0-based, in the order given to compress)."),
    base: Optional[Path] = typer.Option(None, "--base", "-b", help="Pretrained checkpoint; without it the task vector is written."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .safetensors file or folder."),
    out_dtype: Optional[str] = typer.Option(None, help="Output dtype for floating tensors. Default: the original's."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled base checkpoint (trusted files only)."),
):
    """Rebuild one task's model from a TSV-C file: W_pre + U_i diag(s_i) V_i^T per layer."""
    def body():
        from .io import SafetensorsSink, load_compressed, open_checkpoint

        started = time.perf_counter()
        packed = load_compressed(compressed)
        pre = open_checkpoint(base, allow_pickle=allow_pickle) if base is not None else None
        weights = packed.reconstruct(task, pre)
        sink = SafetensorsSink(output, inputs=[compressed, *([base] if base else [])], out_dtype=_dtype(out_dtype))
        try:
            for key, tensor in weights.items():
                sink.write(key, tensor)
            sink.close({"method": "tsv-c reconstruct", "task": str(task), "source": compressed.name,
                        "output": "weights" if base else "task_vector"})
        except BaseException:
            sink.abort()
            raise
        summary(started, output)

    _run(body)


# ------------------------------------------------------------------------------------------------
# interference
# ------------------------------------------------------------------------------------------------
@app.command()
def interference(
    models: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints."),
    base: Path = typer.Option(..., "--base", "-b", help="The pretrained checkpoint."),
    output: Path = typer.Option(Path("sti.json"), "--output", "-o", help="Per-layer STI as .json or .csv."),
    plot: Optional[Path] = typer.Option(None, help="PNG of STI across layers (paper Fig. 6)."),
    heatmap: Optional[Path] = typer.Option(None, help="PNG of task-block similarity |U_i^T U_j| of one layer (paper Fig. 3)."),
    layer: Optional[str] = typer.Option(None, help="Layer key for --heatmap. Default: the middle merged matrix."),
    rank_fraction: Optional[float] = typer.Option(None, help="Per-task rank. Default: 1/T."),
    exclude: Optional[list[str]] = typer.Option(None, help="Keys left out (as in merge). Default: text_projection."),
    orthogonalized: bool = typer.Option(False, help="STI after TSV-M's orthogonalisation (~0 unless rank-deficient)."),
    device: Optional[str] = typer.Option(None, help="Where to compute. Default: cpu."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled torch files (trusted files only)."),
    exact: bool = typer.Option(False, "--exact", help="Factors from float64 full SVDs (the authors' route)."),
):
    """Singular Task Interference per layer: STI = ||(U^T U - I) S (V^T V - I)||_1 (paper Eq. 7)."""
    def body():
        from .sti import interference as sti_of, per_block

        started = time.perf_counter()
        pre, fts = _open_all(base, list(models), allow_pickle)
        excl = tuple(exclude) if exclude else ("text_projection",)
        per_layer = sti_of(pre, fts, rank_fraction=rank_fraction, exclude=excl, orthogonalized=orthogonalized,
                           device=device, progress=True, exact=exact)
        blocks = per_block(per_layer)
        similarity = None
        if heatmap is not None:
            key = layer or (list(per_layer)[len(per_layer) // 2] if per_layer else None)
            if key is None:
                raise CliError("no merged matrix to draw a heatmap of")
            similarity = block_similarity(pre, fts, key, rank_fraction, device)
            plot_heatmap(heatmap, key, similarity)
        write_sti(output, per_layer, blocks, similarity)
        if plot is not None:
            plot_sti(plot, per_layer, blocks)
        print_sti_table(per_layer)
        summary(started, output)

    _run(body)


def write_sti(path: Path, per_layer: dict, blocks: dict, similarity: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "sti"])
            writer.writerows(per_layer.items())
        return
    data = {"per_layer": per_layer, "per_block": blocks}
    if similarity is not None:
        data["block_similarity"] = similarity
    path.write_text(json.dumps(data, indent=2))


def print_sti_table(per_layer: dict, limit: int | None = None) -> None:
    from .sti import per_block

    width = max([len(k) for k in per_layer] + [5])
    typer.echo(f"{'layer'.ljust(width)}  STI")
    items = list(per_layer.items())
    for key, value in items[:limit] if limit else items:
        typer.echo(f"{key.ljust(width)}  {value:.4g}")
    if limit and len(items) > limit:
        typer.echo(f"... {len(items) - limit} more layers")
    blocks = per_block(per_layer)
    typer.echo(f"total STI {sum(per_layer.values()):.4g} over {len(per_layer)} layers, {len(blocks)} blocks")


def block_similarity(pre, fts, key: str, rank_fraction, device) -> dict:
    """‖U_iᵀU_j‖_F / k for one layer (1 on the diagonal) and the full |UᵀU| of the stacked U."""
    import torch

    from .backends import resolve_backend
    from .reference import rank_per_task

    if key not in pre.keys():
        raise CliError(f"layer {key!r} not found in {pre.name}")
    shape = pre.shape(key)
    if len(shape) != 2:
        raise CliError(f"layer {key!r} has shape {shape}, not a matrix")
    k = rank_per_task(shape, len(fts), rank_fraction)
    if k == 0:
        raise CliError(f"layer {key!r}: rank per task is 0 for {len(fts)} tasks")
    dev = torch.device(device or "cpu")
    ft = torch.stack([c.load(key).to(dev) for c in fts]).unsqueeze(0)
    u = resolve_backend(None, dev).task_factors(ft, pre.load(key).to(dev).unsqueeze(0), k)[0][0]  # [T, m, k]
    stacked = u.permute(1, 0, 2).reshape(u.shape[1], -1)
    gram = (stacked.mT @ stacked).abs().cpu()
    blocks = torch.linalg.matrix_norm(u.mT.unsqueeze(1) @ u.unsqueeze(0)) / math.sqrt(k)
    return {"layer": key, "k": k, "blocks": blocks.cpu().tolist(), "gram_abs": gram.tolist()}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise CliError("plots need matplotlib: pip install 'tsv_fast[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sti(path: Path, per_layer: dict, blocks: dict) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.plot(range(len(per_layer)), list(per_layer.values()), marker="o", ms=3)
    ax1.set(xlabel="layer (checkpoint order)", ylabel="STI", title="STI per layer", yscale="log")
    names = [name.rsplit(".", 1)[-1] if name[-1].isdigit() else name for name in blocks]
    ax2.bar(range(len(blocks)), list(blocks.values()))
    ax2.set_xticks(range(len(blocks)), names, rotation=90, fontsize=7)
    ax2.set(xlabel="block", ylabel="STI (sum over the block)", title="STI per block")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmap(path: Path, key: str, similarity: dict) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    image = ax1.imshow(similarity["gram_abs"], cmap="viridis", vmin=0, vmax=1)
    ax1.set_title(f"|UᵀU|, k = {similarity['k']} per task")
    fig.colorbar(image, ax=ax1, fraction=0.046)
    blocks = similarity["blocks"]
    image = ax2.imshow(blocks, cmap="magma", vmin=0, vmax=1)
    ax2.set(title="‖U_iᵀU_j‖_F / √k", xlabel="task j", ylabel="task i")
    for i, row in enumerate(blocks):
        for j, value in enumerate(row):
            ax2.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                     color="black" if value > 0.5 else "white")
    fig.colorbar(image, ax=ax2, fraction=0.046)
    fig.suptitle(key)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------
@app.command()
def convert(
    source: Path = typer.Argument(..., help="A torch .pt/.bin (or any readable) checkpoint."),
    output: Path = typer.Argument(..., help="Output .safetensors file or folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Unpickle whole pickled modules. Runs code from the file: trusted files only."),
    max_shard_size: Optional[str] = typer.Option(None, help="Shard the output, e.g. 5GB."),
):
    """Convert a checkpoint (e.g. a pickled .pt of the TSV or task-arithmetic papers) to safetensors once."""
    def body():
        from .io import convert as convert_file

        started = time.perf_counter()
        out = convert_file(source, output, allow_pickle=allow_pickle, max_shard_bytes=parse_size(max_shard_size))
        summary(started, Path(out))

    _run(body)


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
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
        from . import synthetic
        from .io import open_checkpoint, save_checkpoint

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
            out, rep = run_merge_command(
                {"base_model": paths[0], "models": paths[1:], "output": str(output),
                 "alpha": 1.0, "rank_fraction": None, "exclude": ["text_projection"], "dtype": "float32",
                 "out_dtype": None, "device": None, "max_shard_size": None, "backend": None,
                 "max_chunk_size": "256MB", "allow_pickle": False}, quiet=True)
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

    _run(body)


@app.command()
def version():
    """Print the package version and the available backends."""
    from . import __version__
    from .backends import available_backends

    typer.echo(f"tsv_fast {__version__}")
    for name, reasons in available_backends().items():
        typer.echo(f"  {name}: {'available' if not reasons else '; '.join(reasons)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
