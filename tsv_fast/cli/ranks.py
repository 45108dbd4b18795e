"""Merges over several processes: ``tsv-fast finalize``, and what ``merge``, ``compress`` and
``interference`` do under torchrun (engine.distributed) or as ``merge --shard I/N`` parts (io.parts)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from .app import app
from .common import CliError, human_bytes, run_command, summary


@app.command()
def finalize(
    output: Path = typer.Argument(..., help="The output the parts were written for (`tsv-fast merge ... -o OUTPUT --shard I/N`)."),
    keep_parts: bool = typer.Option(False, "--keep-parts", help="Leave the parts folder (OUTPUT.parts) in place."),
):
    """Put the N parts of a `merge --shard I/N` job array together into one model, committed whole.

    Refuses (and writes nothing) when a part is missing or the parts come from different plans
    (other inputs, options or tsv_fast version).

    Example:  for i in 0 1 2 3; do tsv-fast merge -b pre/ ft*/ -o merged/ --shard $i/4 & done; wait
              tsv-fast finalize merged/
    """
    def body():
        from ..io.parts import finalize as put_together

        started = time.perf_counter()
        path = put_together(output, keep_parts=keep_parts)
        summary(started, path)

    run_command(body)


@contextmanager
def launched(device: str | None) -> Iterator[tuple[object, str | None]]:
    """engine.distributed.launched under torchrun (WORLD_SIZE > 1): (Dist, this rank's device); else
    (None, ``device``) without importing torch, so that argument errors stay as quick as --help."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        yield None, device
        return
    from ..engine.distributed import launched as ranks

    with ranks(device) as pair:
        yield pair


def parse_shard(text: str | None):
    """``--shard I/N`` -> engine.partition.Part (None when not given)."""
    if text is None:
        return None
    from ..engine.partition import Part

    try:
        return Part.parse(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def write_model(output: str, sink_args: dict, source, method, options, *, dist=None, shard=None, **run_args):
    """The engine run behind `tsv-fast merge`: one process, one rank of a torchrun job, or one part."""
    from ..engine.run import run
    from ..io.sink import SafetensorsSink

    if dist is not None:
        from ..engine.distributed import run_to_files

        if shard is not None:
            raise CliError("--shard is for independent jobs; under torchrun the ranks split the plan themselves")
        return run_to_files(dist, source, method, options,
                            lambda **more: SafetensorsSink(output, **sink_args, **more), **run_args)
    if shard is not None:
        from ..io.parts import PartSink

        sink = PartSink(output, shard, options=plan_options(options, method), **sink_args)
        return run(source, method, options, sink, part=shard, **run_args)
    return run(source, method, options, SafetensorsSink(output, **sink_args), **run_args)


#: Options that change at most the rounding of a merge (parts may differ in them): where and how it runs.
ROUNDING_ONLY = ("backend", "device", "max_chunk_bytes", "progress")


def plan_options(options, method) -> dict:
    """The settings that change a merge's result (the identity of a --shard plan, with the inputs and
    the files' metadata): every option but those in ``ROUNDING_ONLY``, and the method's parameters."""
    out = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name not in ROUNDING_ONLY}
    out["method"] = method.name
    if dataclasses.is_dataclass(method):
        out.update({f"{method.name}.{f.name}": getattr(method, f.name) for f in dataclasses.fields(method)})
    return {key: value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
            for key, value in out.items()}


def compress(dist, pre, fts, storage_dtype, **keywords):
    """TSV-C over the ranks of ``dist`` (as api.compress): the CompressedTasks on rank 0, else None."""
    from ..engine.distributed import run_gathered
    from ..api import _tasks
    from ..methods import get_method
    from ..methods.tsv_c import CompressedSink
    from ..options import Options

    source = _tasks(pre, fts)  # full checkpoints or LoRA adapters, as api.compress / api.interference
    options = Options.of(None, **keywords)
    packed, _ = run_gathered(dist, source, get_method("tsv-c", storage_dtype=storage_dtype), options,
                             lambda: CompressedSink(source.reference, source.num_tasks))
    if packed is not None:  # the header api.compress writes
        packed.metadata.update({"exclude": json.dumps(list(options.exclude)), "min_rank": str(options.min_rank),
                                **({"rank_overrides": json.dumps(options.rank_overrides)} if options.rank_overrides
                                   else {})})
    return packed


def interference(dist, pre, fts, *, orthogonalized: bool, **keywords):
    """STI per layer over the ranks of ``dist`` (as api.interference): on rank 0, else None."""
    import torch

    from ..engine.distributed import run_gathered
    from ..api import _tasks
    from ..io.checkpoint import DictSink
    from ..methods import get_method
    from ..options import Options

    keywords.setdefault("compute_dtype", torch.float64)
    source = _tasks(pre, fts)  # full checkpoints or LoRA adapters, as api.compress / api.interference
    scores, _ = run_gathered(dist, source, get_method("sti", orthogonalized=orthogonalized),
                             Options.of(None, **keywords), DictSink)
    if scores is None:
        return None
    order = {key: i for i, key in enumerate(source.reference.keys())}
    return dict(sorted(scores.items(), key=lambda item: order[item[0]]))


def rank_summary(report) -> None:
    """Per rank of a distributed run: keys, seconds, peak memory (rank 0 prints it)."""
    if report is not None and report.ranks:
        typer.echo("ranks: " + "; ".join(
            f"{r['rank']}: {r['keys']} keys, {r['seconds']:.1f} s, peak {human_bytes(r['peak_rss_bytes'])}"
            for r in report.ranks))
