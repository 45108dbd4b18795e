"""The driver of every run: plan, then stream each group of same-shape matrices through a method.

Data flow (DESIGN.md §3): a task source -> a plan (which keys are factored, in which same-shape
groups, which are combined elementwise, which pass through) -> per chunk of a group: the method asks
the chunk for what it needs (each task's top-k factors, the sum of the task vectors) and makes its
output (merged weights, TSV-C factors, STI) -> sink. Peak memory is one chunk × T, never T models.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import Backend, ExactBackend, resolve_backend
from ..io.checkpoint import DictSink, LowRank, Sink
from ..options import Options, dtype_name
from ..reference import warn_zero_rank
from .heap import bound_heap_growth
from .partition import Part
from .plan import make_plan
from .report import Report

log = logging.getLogger("tsv_fast")


@dataclass
class Context:
    """What a method sees besides its chunk."""

    backend: Backend
    options: Options
    device: torch.device
    num_tasks: int
    compute_sti: bool = False
    low_rank: bool = False   # hand the sink LowRank updates where a chunk's tasks are all factored

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.options.compute_dtype

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The output dtype of a key whose base has ``dtype`` (Options.out_dtype for floating keys)."""
        return self.options.out_dtype if self.options.out_dtype is not None and dtype.is_floating_point else dtype


def backend_for(options: Options, device: torch.device) -> Backend:
    """The backend of a run: the named/auto one, or the full-SVD route when ``options.exact``."""
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise RuntimeError(f"device {str(device)!r} is not available: {reason} (torch {torch.__version__}); "
                           "use --device cpu")
    if not options.exact:
        return resolve_backend(options.backend, device)
    if options.backend not in (None, "auto", "torch"):
        raise ValueError(f"exact=True runs the full-SVD route with torch.linalg.svd; it cannot use "
                         f"backend={options.backend!r} (pass backend='auto' or 'torch')")
    return ExactBackend(options.compute_dtype)


def run(source, method, options: Options, sink: Sink | None = None, *, compute_sti: bool = False,
        metadata: dict[str, str] | None = None, low_rank: bool = False, part: Part | None = None
        ) -> tuple[object, Report]:
    """Run ``method`` over ``source``; the sink receives one output per key. Returns what the sink's
    ``close`` returns (a dict for DictSink, a path for file sinks) and the Report. The run owns the
    sink: whatever fails or interrupts it, from the first check on, aborts the sink.

    ``low_rank`` (factored sources and weight methods only): the sink receives updates instead of
    weights: an ``io.checkpoint.LowRank`` α·M = left rightᵀ for each matrix whose tasks are all
    factored, the merged weight for every other key the tasks change, nothing for keys they leave.

    ``part``: run only this part's keys of the plan (a rank of a distributed run or a ``--shard``
    job, engine.partition); nothing else is read.
    """
    started = time.perf_counter()
    bound_heap_growth()
    sink = sink or DictSink()

    def emit(key: str, value: object) -> None:
        if isinstance(value, Tensor):  # weights in the output dtype (unchanged keys: the base, exactly)
            value = value.to(out_device, ctx.out_dtype(value.dtype) if method.writes == "weights" else value.dtype)
        elif isinstance(value, LowRank):
            value = value.to(out_device)
        if value is not None:
            sink.write(key, value)

    def keep(key: str) -> None:  # a key no task changes: its base weight, which is no update
        if not low_rank:
            emit(key, method.unchanged(key, source.base_tensor(key, device), ctx))

    try:  # from here on any failure drops the sink's partial output
        method.check_options(options)
        if low_rank and not (source.factored and method.writes == "weights"):
            raise ValueError(f"factored outputs need factored inputs (LoRA adapters, a TSV-C library) and a merge "
                             f"method; got {type(source).__name__} and {method.name!r}")
        source.check(options)
        plan = make_plan(source, method, options, low_rank)
        if method.uses_rank_rule and (part is None or part.index == 0):
            warn_zero_rank(plan.zero_rank)  # once, for the whole plan
        if part is not None:
            plan = part.select(plan, source, method, options)
        device = torch.device(options.device) if options.device is not None else source.reference.device
        backend = backend_for(options, device)
        report = Report(backend=backend.name, method=method.name, num_tasks=source.num_tasks,
                        averaged=list(plan.elementwise), zero_rank=list(plan.zero_rank))
        ctx = Context(backend, options, device, source.num_tasks, compute_sti, low_rank)
        out_device = source.reference.device
        for key in plan.elementwise:
            emit(key, method.elementwise(key, source.base_tensor(key, device),
                                         source.deltas(key, options.compute_dtype, device), ctx))
        for key in [*plan.unchanged, *plan.zero_rank]:  # no update, as in the authors' code
            keep(key)
        with _progress(plan.matrices, options.progress) as bar:  # closed (a newline) on failures too
            for chunk, zero in source.chunks(plan.groups, backend, options, device):
                if part is not None:
                    part.check()  # another rank failed: stop here
                for key in zero:  # every task vector is zero here: no factor work
                    report.zero_delta.append(key)
                    keep(key)
                if chunk.keys:
                    for key, value, layer in method.merge_group(chunk, ctx):
                        emit(key, value)
                        if layer is not None:
                            report.layers[key] = layer
                            log.info("%s: k=%d κ(U)=%.3g κ(V)=%.3g", key, layer.k, layer.kappa_u, layer.kappa_v)
                bar.update(len(chunk.keys) + len(zero))
        report.seconds = time.perf_counter() - started
        result = sink.close({**run_metadata(method, options, source), **(metadata or {})})
    except BaseException:
        sink.abort()
        raise
    return result, report


def run_metadata(method, options: Options, source) -> dict[str, str]:
    from .. import __version__

    meta = {"method": method.name, "output": method.writes if source.has_base or method.writes != "weights"
            else "task_vector", "num_tasks": str(source.num_tasks),
            "compute_dtype": dtype_name(options.compute_dtype),
            "route": "full-svd (exact)" if options.exact else "float64 gram", "tsv_fast_version": __version__}
    if method.writes == "weights":
        meta["alpha"] = str(options.alpha)
    if method.uses_rank_rule:
        meta["rank_fraction"] = str(options.rank_fraction or f"1/{source.num_tasks}")
    meta.update(method.metadata())
    meta.update(source.metadata())
    return meta


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="layers", desc="tsv")
