"""The merge engine: plan, then stream same-shape groups of layers through a backend.

Data flow (DESIGN.md §3): checkpoints -> plan (which keys are matrices, their rank, same-shape
groups, consistency checks) -> per chunk of a group: load T slices -> top-k factors -> Grams (κ, STI)
-> polar factors -> fused reconstruction -> sink. Peak memory is one chunk × T, never T models.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .backends import Backend, ExactBackend, resolve_backend
from .checkpoint import Checkpoint, DictSink, Sink, as_checkpoint
from .reference import is_merged_as_matrix, rank_per_task, warn_zero_rank

log = logging.getLogger("tsv_fast")

COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass
class Options:
    """Options shared by merge, compress and interference (see fast_tsv_merge for their meaning)."""

    rank_fraction: float | None = None
    rank_overrides: Mapping[str, float | int] | None = None
    exclude: Sequence[str] = ("text_projection",)
    min_rank: int = 0
    compute_dtype: torch.dtype = torch.float32
    backend: str | None = None
    device: torch.device | str | None = None
    max_chunk_bytes: int = 256 << 20  # inputs + float64 work buffers of one chunk
    progress: bool = False
    exact: bool = False  # the authors' full-SVD route (ExactBackend) instead of the Gram route

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {self.compute_dtype}")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        if self.rank_fraction is not None and not 0 < float(self.rank_fraction) <= 1:
            raise ValueError(f"rank_fraction must be in (0, 1], got {self.rank_fraction}")

    def rank(self, key: str, shape: Sequence[int], num_tasks: int) -> int:
        for pattern, value in (self.rank_overrides or {}).items():
            if fnmatch.fnmatchcase(key, pattern):
                if isinstance(value, int):
                    return max(0, min(value, min(shape)))
                return rank_per_task(shape, num_tasks, value, self.min_rank)
        return rank_per_task(shape, num_tasks, self.rank_fraction, self.min_rank)


@dataclass
class LayerReport:
    """What a merge learned about one matrix: its rank, the conditioning of its stacks, its STI."""

    key: str
    shape: tuple[int, ...]
    k: int
    kappa_u: float = math.nan
    kappa_v: float = math.nan
    rank_u: int = 0
    rank_v: int = 0
    sti: float = math.nan


@dataclass
class Report:
    backend: str = ""
    num_tasks: int = 0
    seconds: float = 0.0
    layers: dict[str, LayerReport] = field(default_factory=dict)
    averaged: list[str] = field(default_factory=list)
    zero_rank: list[str] = field(default_factory=list)
    zero_delta: list[str] = field(default_factory=list)


@dataclass
class Plan:
    reference: Checkpoint
    groups: dict[tuple[tuple[int, ...], int, torch.dtype], list[str]]  # (shape, k, dtype) -> keys
    averaged: list[str]
    zero_rank: list[str]


# ------------------------------------------------------------------------------------------------
# Planning and validation
# ------------------------------------------------------------------------------------------------
def make_plan(pretrained: Checkpoint | None, finetuned: Sequence[Checkpoint], options: Options) -> Plan:
    """Check that every checkpoint has the same keys and shapes; sort keys into groups."""
    if len(finetuned) == 0:
        raise ValueError("need at least one fine-tuned checkpoint (task vector)")
    reference = pretrained if pretrained is not None else finetuned[0]
    ref_name = "the pretrained checkpoint" if pretrained is not None else "task vector 0"
    ref_keys = reference.keys()
    ref_set = set(ref_keys)
    for i, ckpt in enumerate(finetuned):
        keys = set(ckpt.keys())
        if keys != ref_set:
            missing, extra = sorted(ref_set - keys), sorted(keys - ref_set)
            raise ValueError(
                f"checkpoint {i} ({ckpt.name}) does not match {ref_name} ({reference.name}): "
                + (f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
                + (f"unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else ""))
        for key in ref_keys:
            if ckpt.shape(key) != reference.shape(key):
                raise ValueError(f"key {key!r}: shape {ckpt.shape(key)} in checkpoint {i} ({ckpt.name}) "
                                 f"but {reference.shape(key)} in {ref_name} ({reference.name})")
    mixed = [key for key in ref_keys if len({c.dtype(key) for c in finetuned} | {reference.dtype(key)}) > 1]
    if mixed:
        warnings.warn(f"{len(mixed)} key(s) have different dtypes across checkpoints (e.g. {mixed[0]!r}); "
                      f"computing in {options.compute_dtype} and writing {ref_name}'s dtype", stacklevel=3)
    groups: dict[tuple[tuple[int, ...], int, torch.dtype], list[str]] = {}
    averaged, zero_rank = [], []
    for key in ref_keys:
        shape = reference.shape(key)
        if not is_merged_as_matrix(key, shape, options.exclude) or not reference.dtype(key).is_floating_point:
            averaged.append(key)
            continue
        k = options.rank(key, shape, len(finetuned))
        if k == 0:
            zero_rank.append(key)
        else:
            groups.setdefault((shape, k, reference.dtype(key)), []).append(key)
    return Plan(reference, groups, averaged, zero_rank)


def _load_checked(ckpt: Checkpoint, key: str, device: torch.device | None = None) -> Tensor:
    tensor = ckpt.load(key)
    # a float32 sum is one fast pass and is finite for finite weights; confirm before failing
    if (tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float32)))
            and not bool(torch.isfinite(tensor).all())):
        raise ValueError(f"key {key!r} of {ckpt.name} contains NaN or Inf")
    return tensor if device is None else tensor.to(device, non_blocking=True)


def backend_for(options: Options, device: torch.device) -> Backend:
    """The backend of a run: the named/auto one, or the full-SVD route when ``options.exact``."""
    if not options.exact:
        return resolve_backend(options.backend, device)
    if options.backend not in (None, "auto", "torch"):
        raise ValueError(f"exact=True runs the full-SVD route with torch.linalg.svd; it cannot use "
                         f"backend={options.backend!r} (pass backend='auto' or 'torch')")
    return ExactBackend(options.compute_dtype)


def _device_of(options: Options, plan: Plan) -> torch.device:
    return torch.device(options.device) if options.device is not None else plan.reference.device


# ------------------------------------------------------------------------------------------------
# The shared pipeline: factors of every matrix, chunk by chunk
# ------------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    keys: list[str]          # layers with a nonzero task matrix
    k: int
    out_dtype: torch.dtype   # dtype of the reference checkpoint for these keys
    pretrained: Tensor | None  # [L, m, n] input dtype, or None
    u: Tensor                # [L, T, m, k] float64
    sigma: Tensor            # [L, T, k] float64
    v: Tensor                # [L, T, n, k] float64


@dataclass
class _Job:
    """One load of the pipeline: the T_b task slices (tasks t0 .. t0+T_b) of some same-shape layers."""

    keys: list[str]
    shape: tuple[int, ...]
    k: int
    out_dtype: torch.dtype
    t0: int
    t1: int
    last: bool  # the job that completes these layers' tasks


def _jobs(plan: Plan, num_tasks: int, budget: int) -> Iterator[_Job]:
    """Same-shape layers batched while L × T matrices fit ``budget``; a layer too large for it has
    its tasks split into batches, so memory never scales with T × the model."""
    for (shape, k, out_dtype), keys in plan.groups.items():
        per_matrix = math.prod(shape) * 8 * 3  # float64 Δ, its Gram and product buffers
        layers = max(1, budget // (per_matrix * num_tasks))
        tasks = min(num_tasks, max(1, budget // per_matrix))
        for start in range(0, len(keys), layers):
            for t0 in range(0, num_tasks, tasks):
                t1 = min(num_tasks, t0 + tasks)
                yield _Job(keys[start:start + layers], shape, k, out_dtype, t0, t1, t1 == num_tasks)


def _stack_to(tensors: list[Tensor], device: torch.device) -> Tensor:
    stacked = torch.stack(tensors)
    if device.type == "cuda" and stacked.device.type == "cpu":
        stacked = stacked.pin_memory()  # so the host-to-device copy is asynchronous
    return stacked.to(device, non_blocking=True)


def _read_ahead(load, jobs: Iterator[_Job], enabled: bool) -> Iterator[tuple[_Job, object]]:
    """(job, load(job)) in order; with ``enabled`` the next job loads in a thread during compute.

    File reads, tensor copies and BLAS all release the GIL, so loading overlaps the factor work;
    at most two jobs' inputs are held at once.
    """
    if not enabled:
        for job in jobs:
            yield job, load(job)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsv-fast-load") as pool:
        pending = None
        for job in jobs:
            submitted = (job, pool.submit(load, job))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1].result()


def factor_chunks(pretrained: Checkpoint | None, finetuned: Sequence[Checkpoint], plan: Plan,
                  options: Options, backend: Backend, report: Report,
                  on_zero_delta=None) -> Iterator[Chunk]:
    """Top-k factors of every matrix key, chunk by chunk, within ``options.max_chunk_bytes``.

    Layers whose T task matrices are all zero skip the factor work (a frozen embedding costs the
    published code T full SVDs for nothing).
    """
    device = _device_of(options, plan)
    num_tasks = len(finetuned)

    def load(job: _Job) -> tuple[list[str], Tensor | None, Tensor]:
        keys = job.keys
        if job.t1 - job.t0 < num_tasks:  # tasks split in batches: decide on zeros before any work
            keys = [key for key in keys if not _all_tasks_zero(pretrained, finetuned, key)]
        pre = _stack_to([_load_checked(pretrained, key) for key in keys], device) if pretrained is not None and keys else None
        ft = _stack_to([torch.stack([_load_checked(c, key) for c in finetuned[job.t0:job.t1]]) for key in keys],
                       device) if keys else None
        return keys, pre, ft

    bar = _progress(sum(len(keys) for keys in plan.groups.values()), options.progress, "layers")
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for job, (keys, pre, ft) in _read_ahead(load, _jobs(plan, num_tasks, options.max_chunk_bytes), True):
        if job.t0 == 0:  # layers of this job that are all zero get their base and no factor work
            if ft is not None and job.last:
                differs = (ft != pre.unsqueeze(1)) if pre is not None else (ft != 0)
                live = differs.flatten(1).any(dim=1).tolist()
                keys, ft = [key for key, x in zip(keys, live) if x], ft[torch.tensor(live, device=ft.device)]
                pre = pre[torch.tensor(live, device=pre.device)] if pre is not None else None
            for key in job.keys:
                if key not in keys:
                    report.zero_delta.append(key)
                    if on_zero_delta is not None:
                        on_zero_delta(key, _unchanged(pretrained, finetuned, key, device))
        if keys:
            parts.append(backend.task_factors(ft, pre, job.k))
        del ft
        if job.last:
            if parts:
                u, sigma, v = (torch.cat(p, dim=1) if len(p) > 1 else p[0] for p in zip(*parts))
                yield Chunk(keys, job.k, job.out_dtype, pre, u, sigma, v)
            parts = []
            bar.update(len(job.keys))
    bar.close()


def _all_tasks_zero(pretrained: Checkpoint | None, finetuned: Sequence[Checkpoint], key: str) -> bool:
    """True when every fine-tune equals the pretrained tensor (or every task vector is zero)."""
    if pretrained is None:
        return all(not bool(c.load(key).any()) for c in finetuned)
    base = pretrained.load(key)
    return all(torch.equal(c.load(key), base) for c in finetuned)


def _progress(total: int, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, desc="tsv")


def stacks(chunk: Chunk) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate the tasks of each layer: U [L, m, T·k], σ [L, T·k], V [L, n, T·k]."""
    layers, tasks, m, k = chunk.u.shape
    n = chunk.v.shape[2]
    return (chunk.u.permute(0, 2, 1, 3).reshape(layers, m, tasks * k), chunk.sigma.reshape(layers, tasks * k),
            chunk.v.permute(0, 2, 1, 3).reshape(layers, n, tasks * k))


def _kappa_and_rank(evals: Tensor) -> tuple[list[float], list[int]]:
    """κ(X) = sqrt(λ_max / λ_min) of its Gram over the numerical range, and that range's size."""
    from .reference import GRAM_RTOL

    floor = GRAM_RTOL * evals.shape[-1] * evals[..., -1:].clamp_min(0)
    kept = evals > floor
    smallest = torch.where(kept, evals, torch.inf).amin(dim=-1)
    kappa = (evals[..., -1] / smallest).sqrt()
    return kappa.tolist(), kept.sum(dim=-1).tolist()


# ------------------------------------------------------------------------------------------------
# TSV-M
# ------------------------------------------------------------------------------------------------
def merge_stacks(backend: Backend, base: Tensor | None, u: Tensor, sigma: Tensor, v: Tensor, keys: Sequence[str],
                 k: int, alpha: float, cd: torch.dtype, out_dtype: torch.dtype,
                 compute_sti: bool = True) -> tuple[Tensor, list[LayerReport]]:
    """base + α·U⊥ diag(σ) V⊥ᵀ for L layers' stacks (U [L,m,K], σ [L,K], V [L,n,K], float64), with
    each layer's report: κ(U), κ(V) and numerical ranks from the stack Grams, and the STI."""
    u_orth, gram_u, evals_u = backend.orthogonalize(u)
    v_orth, gram_v, evals_v = backend.orthogonalize(v)
    sti = backend.sti(gram_u, sigma, gram_v).tolist() if compute_sti else [math.nan] * len(keys)
    merged = backend.reconstruct(base, (u_orth * sigma.unsqueeze(1)).to(cd), v_orth.to(cd), alpha, out_dtype)
    kappa_u, rank_u = _kappa_and_rank(evals_u)
    kappa_v, rank_v = _kappa_and_rank(evals_v)
    shape = tuple(merged.shape[1:])
    return merged, [LayerReport(key, shape, k, kappa_u[i], kappa_v[i], rank_u[i], rank_v[i], sti[i])
                    for i, key in enumerate(keys)]


def run_merge(pretrained: Checkpoint | None, finetuned: Sequence[Checkpoint], options: Options, *,
              alpha: float = 1.0, sink: Sink | None = None, compute_sti: bool = False) -> tuple[object, Report]:
    """TSV-M over checkpoints. With ``pretrained`` None the inputs are task vectors and M is returned."""
    started = time.perf_counter()
    plan = make_plan(pretrained, finetuned, options)
    device = _device_of(options, plan)
    backend = backend_for(options, device)
    report = Report(backend=backend.name, num_tasks=len(finetuned), averaged=list(plan.averaged),
                    zero_rank=list(plan.zero_rank))
    sink = sink or DictSink()
    out_device = plan.reference.device
    cd = options.compute_dtype

    def emit(key: str, tensor: Tensor) -> None:
        sink.write(key, tensor.to(out_device))

    try:
        for key in plan.averaged:
            emit(key, _averaged(pretrained, finetuned, key, alpha, cd, device))
        warn_zero_rank(plan.zero_rank)
        for key in plan.zero_rank:  # no matrix update, as in the authors' code
            emit(key, _unchanged(pretrained, finetuned, key, device))
        for chunk in factor_chunks(pretrained, finetuned, plan, options, backend, report,
                                   on_zero_delta=lambda key, base: emit(key, base.clone())):
            merged, layers = merge_stacks(backend, chunk.pretrained, *stacks(chunk), chunk.keys, chunk.k, alpha,
                                          cd, chunk.out_dtype, compute_sti)
            for key, weight, layer in zip(chunk.keys, merged, layers):
                emit(key, weight)
                report.layers[key] = layer
                log.info("%s: k=%d κ(U)=%.3g κ(V)=%.3g", key, layer.k, layer.kappa_u, layer.kappa_v)
        report.seconds = time.perf_counter() - started
        result = sink.close(_metadata(options, alpha, len(finetuned), pretrained is None))
    except BaseException:
        sink.abort()
        raise
    return result, report


def _averaged(pretrained: Checkpoint | None, finetuned: Sequence[Checkpoint], key: str, alpha: float,
              cd: torch.dtype, device: torch.device) -> Tensor:
    """Non-matrix keys: base + α · mean of the task vectors (integer buffers pass through)."""
    reference = pretrained if pretrained is not None else finetuned[0]
    base = _load_checked(reference, key, device)
    if not base.is_floating_point():
        return base.clone()
    total = torch.zeros(base.shape, dtype=cd, device=device)
    for c in finetuned:  # a running sum: one copy in memory, not T
        total += _load_checked(c, key, device)
    mean = total / len(finetuned)
    if pretrained is None:
        return (mean if alpha == 1.0 else alpha * mean).to(base.dtype)
    return (base.to(cd) + alpha * (mean - base.to(cd))).to(base.dtype)


def _unchanged(pretrained: Checkpoint | None, finetuned: Sequence[Checkpoint], key: str,
               device: torch.device) -> Tensor:
    if pretrained is None:
        return torch.zeros(finetuned[0].shape(key), dtype=finetuned[0].dtype(key), device=device)
    return _load_checked(pretrained, key, device).clone()


def _metadata(options: Options, alpha: float, num_tasks: int, task_vector: bool) -> dict[str, str]:
    from . import __version__

    return {"method": "tsv-m", "output": "task_vector" if task_vector else "weights", "num_tasks": str(num_tasks),
            "alpha": str(alpha), "rank_fraction": str(options.rank_fraction or f"1/{num_tasks}"),
            "compute_dtype": str(options.compute_dtype).replace("torch.", ""),
            "route": "full-svd (exact)" if options.exact else "float64 gram", "tsv_fast_version": __version__}


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def fast_tsv_merge(task_vectors: Sequence[Mapping[str, Tensor]], *, rank_fraction: float | None = None,
                   exclude: Sequence[str] = ("text_projection",), backend: str = "auto",
                   device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.float32,
                   min_rank: int = 0, rank_overrides: Mapping[str, float | int] | None = None,
                   max_chunk_bytes: int = 256 << 20, progress: bool = False, exact: bool = False,
                   return_report: bool = False):
    """TSV-M merged task vector M, a drop-in for the authors' ``compute_and_sum_svd_mem_reduction``.

    Args:
        task_vectors: T dicts key -> Δᵢ (same keys and shapes; fp32, bf16 or fp16).
        rank_fraction: per-task rank k = int(min(m, n) · rank_fraction); default 1/T.
        exclude: 2-D keys containing any of these substrings are averaged instead.
        backend: "auto" | "torch" | "triton" | "cusolver" (env TSV_FAST_BACKEND overrides "auto").
        device: where to compute (default: where the inputs are); results return to the inputs' device.
        compute_dtype: torch.float32 (default; Grams and eigensolvers still run in float64) or float64.
        min_rank: lower bound on k (1 keeps layers with min(m, n) < T instead of leaving them unmerged).
        rank_overrides: {glob pattern: int rank or float fraction} per key.
        max_chunk_bytes: memory budget of one chunk of same-shape layers (inputs and float64 work);
            a background thread reads the next chunk meanwhile.
        exact: run the authors' full-SVD route instead (a full SVD per task, Procrustes by SVD, in
            ``compute_dtype``): the published numerics, streamed; equals ``reference.fast_tsv_merge``
            at that dtype and costs what the published code costs (2.5x the default route on CPU).
        return_report: also return a Report (per-layer κ(U), κ(V), numerical ranks, timings).

    Returns:
        dict key -> M (same shapes and dtypes; α not applied). Inputs are never modified.

    Example:
        >>> merged_tv = fast_tsv_merge([tv_mnist, tv_svhn, tv_cars])
        >>> model.load_state_dict({k: w + merged_tv[k] for k, w in pretrained.items()})
    """
    options = Options(rank_fraction, rank_overrides, exclude, min_rank, compute_dtype, backend, device,
                      max_chunk_bytes, progress, exact)
    sources = [as_checkpoint(tv, f"task vector {i}") for i, tv in enumerate(task_vectors)]
    merged, report = run_merge(None, sources, options)
    return (merged, report) if return_report else merged


def tsv_merge(pretrained, finetuned: Sequence, *, alpha: float = 1.0, rank_fraction: float | None = None,
              exclude: Sequence[str] = ("text_projection",), backend: str = "auto",
              device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.float32,
              min_rank: int = 0, rank_overrides: Mapping[str, float | int] | None = None,
              sink: Sink | None = None, max_chunk_bytes: int = 256 << 20, progress: bool = False,
              exact: bool = False, return_report: bool = False):
    """Merged weights W_pre + α·M from a pretrained and T fine-tuned models.

    ``pretrained`` and each of ``finetuned`` may be a state dict, an nn.Module or a checkpoint path
    (safetensors file, model folder, or .pt/.bin loaded with weights_only=True). α = 1.0 is the
    paper's default. Other options as in fast_tsv_merge; ``sink`` redirects the output (e.g. to
    sharded safetensors files) and the call returns what the sink returns.
    """
    options = Options(rank_fraction, rank_overrides, exclude, min_rank, compute_dtype, backend, device,
                      max_chunk_bytes, progress, exact)
    pre = as_checkpoint(pretrained, "the pretrained checkpoint")
    sources = [as_checkpoint(ft, f"fine-tuned checkpoint {i}") for i, ft in enumerate(finetuned)]
    merged, report = run_merge(pre, sources, options, alpha=alpha, sink=sink)
    return (merged, report) if return_report else merged


def task_arithmetic(pretrained, finetuned: Sequence, *, alpha: float = 1.0,
                    compute_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Task Arithmetic baseline: W_pre + α Σᵢ (W_ftᵢ - W_pre), streamed key by key."""
    pre = as_checkpoint(pretrained, "the pretrained checkpoint")
    sources = [as_checkpoint(ft, f"fine-tuned checkpoint {i}") for i, ft in enumerate(finetuned)]
    make_plan(pre, sources, Options(compute_dtype=compute_dtype))  # same keys and shapes everywhere
    out = {}
    for key in pre.keys():
        base = _load_checked(pre, key, pre.device)
        if not base.is_floating_point():
            out[key] = base.clone()
            continue
        total = sum(_load_checked(c, key, pre.device).to(compute_dtype) - base.to(compute_dtype) for c in sources)
        out[key] = (base.to(compute_dtype) + alpha * total).to(base.dtype)
    return out
