"""What every command shares: one-line errors, sizes, the summary line, opening inputs."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer

from ..engine.heap import peak_rss_bytes


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


#: set by `tsv-fast --debug` (or TSV_FAST_DEBUG=1): failures raise with their traceback, for bug reports
DEBUG = bool(os.environ.get("TSV_FAST_DEBUG"))
#: failures a user can cause (bad paths, files, values, options, a busy output); anything else is a bug
USER_ERRORS = (CliError, ValueError, TypeError, LookupError, OSError, RuntimeError)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1)


def run_command(body):
    """Run a command body: every failure is one line on stderr and exit status 1 (130 on Ctrl-C /
    SIGTERM, saying that nothing was written); never a traceback unless --debug."""
    try:
        return body()
    except KeyboardInterrupt:
        typer.secho("interrupted: no output was written (temporary files removed)", err=True)
        raise typer.Exit(130)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place that turns failures into messages
        if DEBUG:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, USER_ERRORS):
            message = (f"internal error ({type(exc).__name__}: {message}); rerun with --debug for the traceback "
                       "and please report it")
        fail(message)


def lora_models(models: list) -> bool:
    """True when every model is a PEFT LoRA adapter; an error when adapters and checkpoints mix."""
    from ..io.peft import is_adapter

    if not models:
        raise CliError("no fine-tuned models given (pass paths, or `models:` in the config)")
    adapters = [str(m) for m in models if is_adapter(m)]
    if adapters and len(adapters) != len(models):
        others = [str(m) for m in models if not is_adapter(m)]
        raise CliError(f"the models mix LoRA adapters ({adapters[0]}, ...) and full checkpoints ({others[0]}, ...); "
                       "merge one kind at a time")
    return bool(adapters)


def open_all(base: Optional[Path], models: list[Path], allow_pickle: bool):
    from ..io.sources import open_checkpoint

    if lora_models(models):
        raise CliError(f"{models[0]} is a LoRA adapter: `tsv-fast merge` takes adapters; this command needs "
                       "full checkpoints")
    pre = open_checkpoint(base, allow_pickle=allow_pickle) if base is not None else None
    return pre, [open_checkpoint(m, allow_pickle=allow_pickle) for m in models]


def open_tasks(base: Path, models: list[Path], allow_pickle: bool):
    """(base, tasks): full checkpoints, or PEFT LoRA adapters of the base (read from their factors)."""
    from ..io.peft import load_adapter
    from ..io.sources import open_checkpoint

    if lora_models(models):
        return open_checkpoint(base, allow_pickle=allow_pickle), [load_adapter(m) for m in models]
    return open_all(base, models, allow_pickle)


def parse_dtype_option(name: Optional[str]):
    from ..options import parse_dtype

    return parse_dtype(name) if name else None




def guard_outputs(inputs, *outputs) -> None:
    """Check every output path against the inputs before any work (io.outputs.check_output)."""
    from ..io.outputs import check_output

    for output in outputs:
        if output is not None:
            check_output(output, inputs)


def local_inputs(models: list) -> list[str]:
    """Every input as a local path, before anything heavy loads: a path that exists, or a Hugging
    Face model id (``org/name[@revision]``, from the hub or its cache: ``io.hf.resolve_model``).
    A name that is neither fails in one line before any id is fetched."""
    from ..io.hf import is_hub_id, resolve_model

    names = [str(m) for m in models]
    for name in names:
        if not Path(name).exists() and not is_hub_id(name):
            raise CliError(f"checkpoint not found: {name}")
    return [resolve_model(name) for name in names]


def config_files(base, output, dtype: str, copy: bool = True) -> dict:
    """The configs and tokenizer files of a base model folder for the output (``io.hf.loadable_files``,
    config.json's dtype set to ``dtype``); a file output cannot hold them: one line says so."""
    from ..io.hf import loadable_files

    if not copy or base is None or not Path(base).is_dir():
        return {}
    files = loadable_files(base, dtype)
    if files and Path(output).suffix == ".safetensors":
        typer.echo(f"note: {output} is one file, so the configs and tokenizer files of {base} were not copied; "
                   "write to a folder (-o merged/) for a model that from_pretrained loads", err=True)
        return {}
    return files


def check_device(device: Optional[str]) -> None:
    """A device that is absent (cuda without CUDA) or malformed fails in one line, before any work."""
    if device is not None:
        from ..options import check_device as check

        check(device)


def parse_overrides(items: list[str]) -> dict:
    """['*.attn.*=32', 'visual.proj=0.5'] -> {pattern: int rank or float fraction}."""
    out = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        try:
            out[pattern] = float(value) if "." in value else int(value)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise CliError(f"--rank-override {item!r}: expected PATTERN=K (a rank) or PATTERN=0.25 (a fraction)")
    return out
