"""A TSV-C library as a task source: merge any subset of its stored tasks, no fine-tune needed.

Each stored task is Δ̂ₜ = Uₜ diag(σₜ) Vₜᵀ per matrix (its top stored-k triplets) and its raw task
vector for the other keys, so it is a factored task like a LoRA adapter (``engine.adapters``): a
method asking for k triplets gets min(k, stored k) of them, from the stored factors, read one key at
a time. Where the stored k covers the method's rank the merge equals the merge of the full
fine-tunes (up to the storage dtype's rounding of the factors); the run's metadata states the k used
per matrix.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from ..io.checkpoint import Checkpoint
from ..io.tsvc import TsvcLibrary
from .adapters import AdapterTasks


class LibraryTasks(AdapterTasks):
    """Tasks ``tasks`` (default: all, in stored order) of ``library`` on the base ``base``."""

    def __init__(self, base: Checkpoint, library: TsvcLibrary, tasks: Sequence[int] | None = None):
        indices = list(range(library.num_tasks)) if tasks is None else list(tasks)
        bad = [t for t in indices if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < library.num_tasks]
        if bad or not indices or len(set(indices)) != len(indices):
            raise ValueError(f"tasks {indices}: choose distinct task numbers 0 … {library.num_tasks - 1} of "
                             f"{library.name} ({library.num_tasks} stored tasks)")
        super().__init__(base, [library.task(t) for t in indices])
        self.library, self.indices = library, indices
        self._k: dict[str, int] = {}

    def check(self, options=None) -> None:
        names = set(self.base.keys())
        missing = [key for key in self.library.keys if key not in names]
        if missing:
            raise ValueError(f"{self.library.name} stores key {missing[0]!r} (and {len(missing) - 1} more), which "
                             f"{self.base.name} does not have; is the library of another base model?")
        for key, info in self.library.keys.items():
            if tuple(info["shape"]) != tuple(self.base.shape(key)):
                raise ValueError(f"key {key!r}: shape {tuple(info['shape'])} in {self.library.name} but "
                                 f"{tuple(self.base.shape(key))} in {self.base.name}")

    def chunks(self, groups, backend, options, device):
        for group in groups:  # the k each matrix gets, for the metadata
            for key in group.keys:
                self._k[key] = min(group.rank, int(self.library.keys[key].get("k", group.rank)))
        return super().chunks(groups, backend, options, device)

    def metadata(self) -> dict[str, str]:
        return {"library": self.library.name, "library_tasks": json.dumps(self.indices),
                "k_rule": "k per task = min(stored k, the method's rank)", "k_per_task": json.dumps(self._k)}
