"""One run over N ranks of torch.distributed (``torchrun --nproc-per-node N -m tsv_fast merge ...``).

Each rank runs the engine on its part of the plan (engine.partition: keys assigned by estimated
cost, a layer's tasks on one rank), reading only its keys, on its own device (CUDA: the GPU of
LOCAL_RANK with NCCL; CPU: gloo). Then:

* a model (``run_to_files``): rank 0 opens the output (the guard, the lock, the staging folder beside
  the target) and the other ranks join its staging folder, which must be on a filesystem they all
  see; each rank writes its own shard files under names that cannot collide; once every rank has
  finished, rank 0 gathers the key -> file maps, names the shards, writes the index and commits the
  output whole (io.sink.commit_shards), exactly as one process commits its own;
* a TSV-C library or STI scores (``run_gathered``): each rank's outputs are gathered on rank 0, which
  replays them, in plan order, into the sink one process would have used (the TSV-C factors are about
  2/T of the task vectors, which one process holds too).

Failures (``outcome``): every step that can fail ends in an all_gather of every rank's status, so all
ranks agree. A rank that fails first says so in the process group's store; the others see it before
their next chunk and stop (``partition.Stopped``) instead of finishing their part; then every rank
raises (the failing rank its own error, the others "rank r of N failed: ...") and rank 0 removes the
staging folder: no partial model. A rank that dies without a word (killed) is met by torchrun, which
stops the others (SIGTERM: the same path), or by the process group's timeout
(``TSV_FAST_DIST_TIMEOUT_S``, default 6 hours: a rank may wait that long for the slowest one).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ..io.checkpoint import Sink
from .heap import peak_rss_bytes
from .partition import Part, Stopped
from .report import Report
from .run import run

FAILED_KEY = "tsv_fast/failed"


class RankFailed(RuntimeError):
    """Another rank of the run failed; this one stopped and wrote nothing."""


@dataclass
class Dist:
    """This process's place in a torch.distributed run (collectives on the default group)."""

    rank: int
    world: int
    local_rank: int

    def all_gather(self, obj: object) -> list:
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather(self, obj: object) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere): only rank 0 holds them all."""
        out = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: object) -> object:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _store(self):
        try:
            return torch.distributed.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):  # no store: ranks stop at the next step instead
            return None

    def say_failed(self) -> None:
        store = self._store()
        if store is not None:
            try:
                store.set(FAILED_KEY, str(self.rank))
            except RuntimeError:
                pass

    def failed(self) -> bool:
        """Has another rank said that it failed? (one store round trip, asked once per chunk)"""
        store = self._store()
        try:
            return store is not None and store.check([FAILED_KEY])
        except RuntimeError:
            return False

    def part(self) -> Part:
        return Part(self.rank, self.world, stop=self.failed)


@contextmanager
def launched(device: str | None = None) -> Iterator[tuple[Dist | None, str | None]]:
    """(Dist, this rank's device) under torchrun (WORLD_SIZE > 1 in the environment), else
    (None, ``device``). CUDA ranks take the GPU of LOCAL_RANK and NCCL, CPU ranks gloo; the process
    group is destroyed on the way out."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield None, device
        return
    if not torch.distributed.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch ({torch.__version__}) has no torch.distributed")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        if torch.device(device).index is not None:
            raise ValueError(f"--device {device}: under torchrun every rank takes the GPU of its LOCAL_RANK; "
                             "pass --device cuda")
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"rank {rank}: LOCAL_RANK {local_rank} but {torch.cuda.device_count()} CUDA "
                               "device(s) visible; start at most one process per GPU")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    timeout = timedelta(seconds=float(os.environ.get("TSV_FAST_DIST_TIMEOUT_S", 6 * 3600)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    try:
        yield Dist(rank, world, local_rank), device
    finally:
        torch.distributed.destroy_process_group()


def outcome(dist: Dist, work: Callable[[], object]) -> object:
    """``work()`` on every rank, then every rank's status gathered: if any rank failed, every rank
    raises (its own error where it failed, RankFailed naming the first failure elsewhere)."""
    try:
        value, error = work(), None
    except BaseException as exc:  # noqa: BLE001 - reported to every rank, then raised
        value, error = None, exc
        dist.say_failed()
    status = None if error is None else (type(error).__name__, " ".join(str(error).split()) or type(error).__name__)
    try:
        statuses = dist.all_gather(status)
    except Exception:  # the process group itself broke (a rank died): our own error first
        if error is not None:
            raise error from None
        raise
    failures = [(rank, s) for rank, s in enumerate(statuses) if s is not None]
    if error is not None and not isinstance(error, Stopped):
        raise error
    if failures:
        rank, (kind, message) = next(((r, s) for r, s in failures if s[0] != Stopped.__name__), failures[0])
        raise RankFailed(f"rank {rank} of {dist.world} failed: {message}; no output was written")
    return value


class _RankSink(Sink):
    """This rank's share of a model output: its shards are finished, never committed (rank 0 commits
    everyone's); a failure drops only its own unfinished shards."""

    def __init__(self, files) -> None:
        self.files = files

    def write(self, key, tensor) -> None:
        self.files.write(key, tensor)

    def close(self, metadata):
        return self.files.finish(metadata), dict(metadata)

    def abort(self) -> None:
        self.files.discard()


def run_to_files(dist: Dist, source, method, options, make_sink: Callable[..., object], **run_args
                 ) -> tuple[Path, Report]:
    """A model output written by every rank (see the module docstring). ``make_sink(tag=, join=)``
    makes this rank's io.sink.SafetensorsSink. Returns the output's path and, on rank 0, the report
    of the whole run (elsewhere this rank's)."""
    options = dataclasses.replace(options, progress=options.progress and dist.rank == 0)
    part, sink = dist.part(), None
    tag = lambda rank: f"rank{rank:05d}"  # noqa: E731
    try:
        # rank 0 opens the output (guard, lock, staging folder); then the others join that folder
        sink = outcome(dist, lambda: make_sink(tag=tag(0)) if dist.rank == 0 else None)
        staging = dist.broadcast(str(sink.output.staging) if dist.rank == 0 else None)
        sink = outcome(dist, lambda: sink if dist.rank == 0 else make_sink(tag=tag(dist.rank), join=staging))
        (staged, metadata), report = outcome(dist, lambda: run(source, method, options, _RankSink(sink), part=part,
                                                                **run_args))
        everyone = dist.gather((staged, report, _usage(report)))
        path = outcome(dist, lambda: sink.commit(every_key_once([s for ss, _, _ in everyone for s in ss], part),
                                                 metadata) if dist.rank == 0 else None)
    except BaseException:
        if sink is not None:
            sink.abort()  # rank 0: the staging folder and the lock; the others: their own files
        raise
    return Path(dist.broadcast(str(path))), (combined(part, everyone) if dist.rank == 0 else report)


def every_key_once(staged: list, part: Part) -> list:
    """``staged`` (every rank's shards), checked to hold each key of the plan exactly once: a key
    written twice or by no rank is never committed."""
    seen: dict[str, int] = {}
    for shard in staged:
        for key in shard.keys:
            seen[key] = seen.get(key, 0) + 1
    twice = sorted(key for key, count in seen.items() if count > 1)
    missing = sorted(set(part.assignment) - set(seen))
    if twice or missing or len(seen) != len(part.assignment):
        what = (f"key {twice[0]!r} was written {seen[twice[0]]} times" if twice else
                f"key {missing[0]!r} was written by no rank" if missing else "the ranks wrote keys outside the plan")
        raise RuntimeError(f"the ranks' shards do not hold every key of the plan once: {what}")
    return staged


class _Recorder(Sink):
    def __init__(self) -> None:
        self.outputs: dict[str, object] = {}

    def write(self, key, value) -> None:
        self.outputs[key] = value

    def close(self, metadata):
        return self.outputs, dict(metadata)


def run_gathered(dist: Dist, source, method, options, make_sink: Callable[[], Sink], **run_args
                 ) -> tuple[object | None, Report]:
    """Outputs gathered on rank 0 into ``make_sink()`` (see the module docstring). Returns what that
    sink's close returns (None on the other ranks) and the report (the whole run's on rank 0)."""
    options = dataclasses.replace(options, progress=options.progress and dist.rank == 0)
    part = dist.part()
    (outputs, metadata), report = outcome(dist, lambda: run(source, method, options, _Recorder(), part=part,
                                                             **run_args))
    everyone = dist.gather((outputs, report, _usage(report)))

    def replay():
        merged = {key: value for outs, _, _ in everyone for key, value in outs.items()}
        if len(merged) != sum(len(outs) for outs, _, _ in everyone):
            raise RuntimeError("two ranks computed the same key: the ranks disagree on the plan's split")
        sink = make_sink()
        try:
            for key in part.order:
                if key in merged:
                    sink.write(key, merged[key])
            return sink.close(metadata)
        except BaseException:
            sink.abort()
            raise

    result = outcome(dist, replay if dist.rank == 0 else lambda: None)
    return result, (combined(part, everyone) if dist.rank == 0 else report)


def _usage(report: Report) -> dict:
    return {"seconds": report.seconds, "peak_rss_bytes": peak_rss_bytes(),
            **({"peak_cuda_bytes": torch.cuda.max_memory_allocated()} if torch.cuda.is_initialized() else {})}


def combined(part: Part, everyone: list) -> Report:
    """One report of the whole run from every rank's, its lists in plan order, plus per rank: keys,
    estimated and measured seconds, peak memory."""
    reports = [report for _, report, _ in everyone]
    position = {key: i for i, key in enumerate(part.order)}
    ordered = lambda keys: sorted(keys, key=position.__getitem__)  # noqa: E731
    layers = {key: layer for report in reports for key, layer in report.layers.items()}
    first, loads = reports[0], part.loads()
    out = Report(backend=first.backend, method=first.method, num_tasks=first.num_tasks,
                 seconds=max(r.seconds for r in reports),
                 layers={key: layers[key] for key in ordered(layers)},
                 averaged=ordered(k for r in reports for k in r.averaged),
                 zero_rank=ordered(k for r in reports for k in r.zero_rank),
                 zero_delta=ordered(k for r in reports for k in r.zero_delta))
    out.ranks = [{"rank": rank, "keys": sum(1 for p in part.assignment.values() if p == rank),
                  "estimated_seconds": loads[rank], **usage} for rank, (_, _, usage) in enumerate(everyone)]
    return out
