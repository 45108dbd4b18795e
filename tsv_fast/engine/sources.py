"""Task sources as the engine reads them: T task vectors of one layout, chunk by chunk.

A source answers the layout (the keys, shapes and dtypes of the base, or of task 0 when the inputs
are task vectors), the task vectors of one key (for elementwise keys), and, for each group of
same-shape matrices, chunks that fit the memory budget. A chunk gives a method what it asks for:
each task's top-k factors (of Δₜ, or of its residual outside a given subspace) and the sum of the
task vectors. ``DenseTasks`` reads full checkpoints (Δ formed on the fly, never stored);
``engine.adapters.AdapterTasks`` reads LoRA adapters (factors from the low-rank pieces). The module
runs a little over 400 lines: the source interface, the dense source with its missing-keys policy and
its chunking read best together.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..io.checkpoint import Checkpoint
from ..io.hf import ignorable_patterns
from ..options import Options
from ..reference import ZERO_RTOL, drop_small

F64 = torch.float64


def load_checked(ckpt: Checkpoint, key: str, device: torch.device | None = None) -> Tensor:
    """``ckpt.load(key)``, refusing NaN/Inf with the key and the checkpoint named."""
    tensor = ckpt.load(key)
    # a float32 sum is one fast pass and is finite for finite weights; confirm before failing
    if (tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float32)))
            and not bool(torch.isfinite(tensor).all())):
        raise ValueError(f"key {key!r} of {ckpt.name} contains NaN or Inf")
    return tensor if device is None else tensor.to(device, non_blocking=True)


def read_ahead(load: Callable, items: Iterable, enabled: bool = True) -> Iterator[tuple[object, object]]:
    """(item, load(item)) in order; the next item loads in a thread while the caller computes.

    File reads, tensor copies and BLAS all release the GIL, so loading overlaps the factor work;
    at most two items' inputs are held at once.
    """
    if not enabled:
        for item in items:
            yield item, load(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsv-fast-load") as pool:
        pending = None
        for item in items:
            submitted = (item, pool.submit(load, item))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1].result()


@dataclass
class Factors:
    """Top singular triplets of T task matrices, stacked per layer, float64.

    U [L, m, K], σ [L, K], V [L, n, K] with K = Σ widths; task t owns the columns
    ``offsets[t] : offsets[t] + widths[t]``. Numerically zero triplets are zero columns with σ = 0.
    """

    u: Tensor
    sigma: Tensor
    v: Tensor
    widths: tuple[int, ...]

    @classmethod
    def from_tasks(cls, u: Tensor, sigma: Tensor, v: Tensor) -> Factors:
        """From per-task factors U [L, T, m, k], σ [L, T, k], V [L, T, n, k] (k columns each)."""
        layers, tasks, m, k = u.shape
        n = v.shape[2]
        return cls(u.permute(0, 2, 1, 3).reshape(layers, m, tasks * k), sigma.reshape(layers, tasks * k),
                   v.permute(0, 2, 1, 3).reshape(layers, n, tasks * k), (k,) * tasks)

    def task(self, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """Task t's factors: U [L, m, w], σ [L, w], V [L, n, w] (views)."""
        start = sum(self.widths[:t])
        width = self.widths[t]
        return self.u[..., start:start + width], self.sigma[..., start:start + width], self.v[..., start:start + width]


class Chunk:
    """Same-shape matrices of one group, processed together: ``keys``, their ``base`` [L, m, n]
    (None when the inputs are task vectors), the group's ``rank`` and the output dtype."""

    keys: list[str]
    shape: tuple[int, ...]
    rank: int
    out_dtype: torch.dtype
    base: Tensor | None

    def task_factors(self, k: int, project_out: Tensor | None = None) -> Factors:
        """Each task's top-k triplets; with ``project_out`` (P [L, m, p], orthonormal columns) those
        of the residual (I - P Pᵀ) Δₜ, whose numerically zero triplets are judged against the task's
        scale (σ <= ZERO_RTOL · ‖Δₜ‖_F, ``reference.drop_small``): a task inside the subspace leaves
        a residual of pure rounding, whose own σ₁ means nothing."""
        raise NotImplementedError

    def task_sum(self) -> Tensor:
        """Σₜ Δₜ [L, m, n], float64."""
        raise NotImplementedError

    def sum_factors(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k triplets of Σₜ Δₜ: U [L, m, k'], σ [L, k'], V [L, n, k'] (k' <= k), float64; numerically
        zero ones are zero columns or left out. Factored sources never form the m×n sum."""
        return tuple(t[:, 0] for t in self.backend.task_factors(self.task_sum().unsqueeze(1), None, k))

    @property
    def factored_only(self) -> bool:
        """True when every task's Δ of these keys is given by low-rank factors (a method may then hand
        the sink a ``LowRank`` update instead of dense weights)."""
        return False


class TaskSource:
    """T task vectors of one layout; see the module docstring."""

    num_tasks: int
    reference: Checkpoint   # the layout: the base, or task 0 when the inputs are task vectors
    has_base: bool
    factored: bool = False  # tasks given by low-rank factors (LoRA adapters, TSV-C libraries)

    def check(self, options: Options | None = None) -> None:
        """Raise ValueError naming the input when the tasks do not fit the layout."""

    def touched(self, key: str) -> bool:
        """False when no task can change ``key`` (it passes through from the base)."""
        return True

    def base_tensor(self, key: str, device: torch.device) -> Tensor:
        """The base weight of ``key``, or zeros of its shape when the inputs are task vectors."""
        raise NotImplementedError

    def deltas(self, key: str, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
        """The T task vectors of one key, one at a time, in ``dtype``."""
        raise NotImplementedError

    def chunks(self, groups, backend, options, device) -> Iterator[tuple[Chunk, list[str]]]:
        """(chunk, keys of that chunk whose task vectors are all zero) for every group."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """What the output's metadata should say about these inputs (asked after the run)."""
        return {}


# ------------------------------------------------------------------------------------------------
# Full checkpoints
# ------------------------------------------------------------------------------------------------
class DenseTasks(TaskSource):
    """A base checkpoint (or None: the tasks are task vectors) and T fine-tuned checkpoints.

    ``weights`` scale each task vector before anything else (1 = as given).
    """

    def __init__(self, base: Checkpoint | None, tasks: Sequence[Checkpoint],
                 weights: Sequence[float] | None = None):
        if len(tasks) == 0:
            raise ValueError("need at least one fine-tuned checkpoint (task vector)")
        self.base, self.tasks = base, list(tasks)
        self.num_tasks = len(self.tasks)
        self.has_base = base is not None
        self.reference = base if base is not None else self.tasks[0]
        if weights is not None and len(weights) != self.num_tasks:
            raise ValueError(f"{len(weights)} weights for {self.num_tasks} tasks")
        self.weights = None if weights is None or all(w == 1 for w in weights) else [float(w) for w in weights]
        self.passthrough: set[str] = set()  # keys that come from the base whatever the tasks hold
        self._ignored: list[str] | None = None

    def check(self, options: Options | None = None) -> None:
        """Refuse tasks that do not fit the layout, naming the checkpoint and the keys. Keys present in
        some checkpoints only follow ``options.missing_keys`` (``Options``): buffers and keys
        transformers ignores when loading come from the base, with a warning naming them (policy
        "base", the default); with "zero" a key a fine-tune lacks is also a zero task vector there."""
        policy = options.missing_keys if options is not None else "base"
        ref, ref_name = self.reference, ("the pretrained checkpoint" if self.has_base else "task vector 0")
        ref_keys = ref.keys()
        ref_set = set(ref_keys)
        task_sets = [set(c.keys()) for c in self.tasks]
        differ = {i: (sorted(ref_set - keys), sorted(keys - ref_set)) for i, keys in enumerate(task_sets)
                  if keys != ref_set}
        if differ:
            self._settle(differ, policy, ref_name)
        for i, ckpt in enumerate(self.tasks):
            for key in ref_keys:
                if key in self.passthrough:
                    continue
                if ckpt.shape(key) != ref.shape(key):
                    raise ValueError(f"key {key!r}: shape {ckpt.shape(key)} in checkpoint {i} ({ckpt.name}) "
                                     f"but {ref.shape(key)} in {ref_name} ({ref.name})")
        mixed = [key for key in ref_keys if key not in self.passthrough
                 and len({c.dtype(key) for c in self.tasks} | {ref.dtype(key)}) > 1]
        if mixed:
            warnings.warn(f"{len(mixed)} key(s) have different dtypes across checkpoints (e.g. {mixed[0]!r}); "
                          f"writing {ref_name}'s dtype", stacklevel=4)

    def _settle(self, differ: dict[int, tuple[list[str], list[str]]], policy: str, ref_name: str) -> None:
        """Apply the missing-keys policy to {task: (keys it lacks, keys the layout lacks)}."""
        ref = self.reference
        dtypes = {key: self.tasks[i].dtype(key) for i, (_, extra) in differ.items() for key in extra}
        dtypes.update({key: ref.dtype(key) for missing, _ in differ.values() for key in missing})
        spare = set() if policy == "error" else {key for key, dtype in dtypes.items() if self._ignorable(key, dtype)}
        for i, (missing, extra) in differ.items():
            refused_missing = [] if policy == "zero" else [k for k in missing if k not in spare]
            refused_extra = [k for k in extra if k not in spare]
            if refused_missing or refused_extra:
                parts = [f"missing keys {_few(refused_missing)}"] * bool(refused_missing) + \
                    [f"unexpected keys {_few(refused_extra)}"] * bool(refused_extra)
                hint = ("; to count a missing key as a zero task vector pass missing_keys='zero' (--missing-keys zero)"
                        if refused_missing and policy == "base" else "")
                raise ValueError(f"checkpoint {i} ({self.tasks[i].name}) does not match {ref_name} ({ref.name}): "
                                 + " ".join(parts) + hint)
        ref_set = set(ref.keys())
        self.passthrough = spare & ref_set
        if self.passthrough:
            warnings.warn(f"{len(self.passthrough)} key(s) missing from some checkpoints are buffers or keys "
                          f"transformers ignores on load; they come from {ref_name}: {_few(sorted(self.passthrough))}",
                          stacklevel=5)
        if spare - ref_set:
            warnings.warn(f"{len(spare - ref_set)} key(s) that {ref_name} lacks are buffers or keys transformers "
                          f"ignores on load; left out of the output: {_few(sorted(spare - ref_set))}", stacklevel=5)
        zero = {i: [k for k in missing if k not in spare] for i, (missing, _) in differ.items()}
        zero = {i: keys for i, keys in zero.items() if keys}
        for i, keys in zero.items():
            self.tasks[i] = _Filled(self.tasks[i], self.base, ref, keys)
        if zero:
            named = ", ".join(f"{self.tasks[i].name} lacks {_few(keys)}" for i, keys in zero.items())
            warnings.warn(f"missing_keys='zero': these keys count as zero task vectors: {named}", stacklevel=5)

    def _ignorable(self, key: str, dtype: torch.dtype) -> bool:
        """A buffer (not floating point) or a key transformers ignores when loading this model."""
        if not dtype.is_floating_point:
            return True
        if self._ignored is None:
            folder = next((c.folder for c in [self.reference, *self.tasks] if getattr(c, "folder", None)), None)
            self._ignored = ignorable_patterns(folder)
        return any(re.search(pattern, key) for pattern in self._ignored)

    def touched(self, key: str) -> bool:
        return key not in self.passthrough

    def base_tensor(self, key: str, device: torch.device) -> Tensor:
        if self.base is None:
            return torch.zeros(self.reference.shape(key), dtype=self.reference.dtype(key), device=device)
        return load_checked(self.base, key, device)

    def deltas(self, key: str, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
        base = load_checked(self.base, key, device).to(dtype) if self.base is not None else None
        for t, ckpt in enumerate(self.tasks):  # one task at a time: memory never scales with T
            delta = load_checked(ckpt, key, device).to(dtype)
            delta = delta - base if base is not None else delta
            yield delta if self.weights is None else delta * self.weights[t]

    def chunks(self, groups, backend, options, device) -> Iterator[tuple[Chunk, list[str]]]:
        jobs = [job for group in groups for job in _jobs(group, self.num_tasks, options.max_chunk_bytes)]
        for job, (keys, zero, base, finetuned) in read_ahead(lambda job: self._load(job, device), jobs):
            yield DenseChunk(self, job, keys, base, finetuned, backend, device), zero

    def _load(self, job: _Job, device: torch.device):
        """The inputs of one chunk: all tasks at once when they fit the budget, else only the base
        (then the chunk loads its task batches as it goes). All-zero layers are set aside."""
        if job.single:
            base = self._stack(job.keys, None, device)
            finetuned = self._stack(job.keys, range(self.num_tasks), device)
            differs = finetuned != base.unsqueeze(1) if base is not None else finetuned != 0
            live = differs.flatten(1).any(dim=1).tolist()
            del differs
            if all(live):
                return list(job.keys), [], base, finetuned
            index = torch.tensor(live, device=finetuned.device)
            return ([key for key, x in zip(job.keys, live) if x], [key for key, x in zip(job.keys, live) if not x],
                    base[index] if base is not None else None, finetuned[index])
        zero = [key for key in job.keys if self._all_zero(key)]
        keys = [key for key in job.keys if key not in zero]
        return keys, zero, self._stack(keys, None, device), None

    def _stack(self, keys: Sequence[str], tasks: range | None, device: torch.device) -> Tensor | None:
        """Base [L, m, n] when ``tasks`` is None, else the fine-tunes [L, T_b, m, n]."""
        if tasks is None:
            if self.base is None or not keys:
                return None
            return _to(torch.stack([load_checked(self.base, key) for key in keys]), device)
        return _to(torch.stack([torch.stack([load_checked(self.tasks[t], key) for t in tasks]) for key in keys]),
                   device)

    def _all_zero(self, key: str) -> bool:
        if self.base is None:
            return all(not bool(c.load(key).any()) for c in self.tasks)
        base = self.base.load(key)
        return all(torch.equal(c.load(key), base) for c in self.tasks)


def _few(keys: Sequence[str]) -> str:
    return f"{list(keys[:5])}{' ...' if len(keys) > 5 else ''}"


class _Filled(Checkpoint):
    """A fine-tune that lacks some keys, read as holding the base's values there (a zero task vector;
    zeros when the inputs are task vectors). Everything else is the checkpoint's own."""

    def __init__(self, ckpt: Checkpoint, base: Checkpoint | None, layout: Checkpoint, missing: Sequence[str]):
        self.ckpt, self.base, self.layout, self.missing, self.name = ckpt, base, layout, set(missing), ckpt.name

    def __getattr__(self, name: str):  # files, folder: the checkpoint's own
        return getattr(self.__dict__["ckpt"], name)

    @property
    def device(self) -> torch.device:
        return self.ckpt.device

    def keys(self) -> list[str]:
        return [*self.ckpt.keys(), *sorted(self.missing)]

    def shape(self, key: str) -> tuple[int, ...]:
        return (self.layout if key in self.missing else self.ckpt).shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return (self.layout if key in self.missing else self.ckpt).dtype(key)

    def load(self, key: str) -> Tensor:
        if key not in self.missing:
            return self.ckpt.load(key)
        if self.base is not None:
            return self.base.load(key)
        return torch.zeros(self.layout.shape(key), dtype=self.layout.dtype(key))


@dataclass
class _Job:
    """One chunk: some same-shape layers, with their tasks in batches when all T do not fit."""

    keys: tuple[str, ...]
    shape: tuple[int, ...]
    rank: int
    out_dtype: torch.dtype
    batches: tuple[tuple[int, int], ...]

    @property
    def single(self) -> bool:
        return len(self.batches) == 1


def _jobs(group, num_tasks: int, budget: int) -> Iterator[_Job]:
    """Layers batched while L × T matrices fit ``budget``; a layer too large for it has its tasks
    split into batches, so memory never scales with T × the model."""
    per_matrix = math.prod(group.shape) * 8 * 3  # float64 Δ, its Gram and product buffers
    layers = max(1, budget // (per_matrix * num_tasks))
    per_batch = min(num_tasks, max(1, budget // per_matrix))
    batches = tuple((t0, min(num_tasks, t0 + per_batch)) for t0 in range(0, num_tasks, per_batch))
    for start in range(0, len(group.keys), layers):
        yield _Job(group.keys[start:start + layers], group.shape, group.rank, group.out_dtype, batches)


def _to(stacked: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda" and stacked.device.type == "cpu":
        stacked = stacked.pin_memory()  # so the host-to-device copy is asynchronous
    return stacked.to(device, non_blocking=True)


class DenseChunk(Chunk):
    def __init__(self, source: DenseTasks, job: _Job, keys: list[str], base: Tensor | None,
                 finetuned: Tensor | None, backend, device: torch.device):
        self.source, self.job, self.keys, self.base = source, job, keys, base
        self.shape, self.rank, self.out_dtype = job.shape, job.rank, job.out_dtype
        self._finetuned, self.backend, self.device = finetuned, backend, device

    def _batches(self) -> Iterator[tuple[int, Tensor]]:
        """(t0, fine-tunes [L, T_b, m, n]) for every task batch; a single batch stays in memory."""
        if self._finetuned is not None:
            yield 0, self._finetuned
            return
        load = lambda batch: self.source._stack(self.keys, range(*batch), self.device)  # noqa: E731
        for (t0, _), finetuned in read_ahead(load, self.job.batches):
            yield t0, finetuned

    def _deltas(self, finetuned: Tensor, t0: int) -> Tensor:
        delta = finetuned.to(F64, copy=True)  # one float64 copy, then in place
        if self.base is not None:
            delta.sub_(self.base.to(F64).unsqueeze(1))
        if self.source.weights is not None:
            scale = torch.tensor(self.source.weights[t0:t0 + delta.shape[1]], dtype=F64, device=delta.device)
            delta.mul_(scale.view(1, -1, 1, 1))
        return delta

    def task_factors(self, k: int, project_out: Tensor | None = None) -> Factors:
        parts = []
        for t0, finetuned in self._batches():
            if project_out is None and self.source.weights is None:
                parts.append(self.backend.task_factors(finetuned, self.base, k))  # Δ formed by the backend
            elif project_out is None:
                parts.append(self.backend.task_factors(self._deltas(finetuned, t0), None, k))
            else:
                delta = self._deltas(finetuned, t0)
                floor = ZERO_RTOL * torch.linalg.matrix_norm(delta)
                p = project_out.unsqueeze(1)
                delta.sub_(p @ (p.mT @ delta))
                parts.append(drop_small(*self.backend.task_factors(delta, None, k), floor))
        u, sigma, v = (torch.cat(p, dim=1) if len(p) > 1 else p[0] for p in zip(*parts))
        return Factors.from_tasks(u, sigma, v)

    def task_sum(self) -> Tensor:
        total = None
        for t0, finetuned in self._batches():
            part = self._deltas(finetuned, t0).sum(dim=1)
            total = part if total is None else total.add_(part)
        return total
