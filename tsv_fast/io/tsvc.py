"""TSV-C task libraries: each task's top-k factors per matrix in one safetensors file.

A library is also a task source: ``TsvcLibrary`` reads one task's factors of one key at a time
(merging any subset of the stored tasks, ``engine.tsvc.LibraryTasks``), and ``append_compressed``
adds tasks to a file, copying the stored ones byte for byte.

Layout: tensors ``task{i}::{key}::U|S|V`` (Uᵢ [m, k], σᵢ [k], Vᵢ [n, k]) for factored matrices and
``task{i}::{key}::delta`` for the other floating keys; the file's metadata key ``tsv_c`` holds a
JSON header (format, version, T, every original key with shape, dtype, kind and k, the storage
accounting). ``CompressedTasks`` is the same content in memory.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..options import parse_dtype
from .checkpoint import as_checkpoint
from .peft import LoraFactor
from .safetensors import check_space, require_file

TSVC_FORMAT = "tsv-c"
TSVC_VERSION = 1


@dataclass
class CompressedTasks:
    """Per-task low-rank factors of every matrix plus the raw task vectors of the other keys.

    ``factors[key] = (U [T, m, k], σ [T, k], V [T, n, k])`` and ``others[key] = Δ [T, ...]``, stored in
    ``storage_dtype``; ``shapes``/``dtypes`` describe the original keys (in checkpoint order).
    """

    factors: dict[str, tuple[Tensor, Tensor, Tensor]]
    others: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    num_tasks: int
    metadata: dict[str, str] = field(default_factory=dict)

    def task_vector(self, task: int) -> dict[str, Tensor]:
        """Δ̂ᵢ: Uᵢ diag(σᵢ) Vᵢᵀ for matrices, the stored Δᵢ for the rest (keys in checkpoint order)."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range: the library holds {self.num_tasks} tasks "
                             f"(0 to {self.num_tasks - 1})")
        out = {}
        for key in self.shapes:
            if key in self.factors:
                u, s, v = (f[task].to(torch.promote_types(f.dtype, torch.float32)) for f in self.factors[key])
                out[key] = (u * s) @ v.mT
            elif key in self.others:
                out[key] = self.others[key][task]
            else:  # zero-rank or all-zero layer
                out[key] = torch.zeros(self.shapes[key])
        return out

    def reconstruct(self, task: int, pretrained: Mapping[str, Tensor] | object | None = None) -> dict[str, Tensor]:
        """Full weights of ``task``: W_pre + Δ̂ᵢ in the original dtypes (task vector if no pretrained)."""
        delta = self.task_vector(task)
        if pretrained is None:
            return {key: d.to(self.dtypes[key]) for key, d in delta.items()}
        pre = as_checkpoint(pretrained, "the pretrained checkpoint")
        missing = [key for key in delta if key not in set(pre.keys())]
        if missing:
            raise ValueError(f"{pre.name} has no key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if
                             len(missing) > 1 else "") + "; is it the base model these tasks were compressed from?")
        out = {}
        for key, d in delta.items():
            if tuple(pre.shape(key)) != tuple(self.shapes[key]):
                raise ValueError(f"key {key!r}: shape {tuple(pre.shape(key))} in {pre.name} but "
                                 f"{tuple(self.shapes[key])} in the TSV-C library")
            base = pre.load(key)
            if not base.is_floating_point():
                out[key] = base.clone()
            else:
                work = torch.promote_types(torch.promote_types(base.dtype, d.dtype), torch.float32)
                out[key] = (base.to(work) + d.to(base.device, work)).to(self.dtypes[key])
        return out

    def storage(self) -> dict[str, int | float]:
        """Numbers stored versus the T dense task vectors (k(m + n + 1) instead of mn per matrix)."""
        stored = sum(u.numel() + s.numel() + v.numel() for u, s, v in self.factors.values())
        stored += sum(t.numel() for t in self.others.values())
        dense = self.num_tasks * sum(torch.Size(shape).numel() for shape in self.shapes.values())
        return {"stored_numbers": stored, "dense_numbers": dense, "ratio": stored / max(dense, 1)}



def _tsvc_name(task: int, key: str, part: str) -> str:
    return f"task{task}::{key}::{part}"


def save_compressed(path: str | os.PathLike, compressed, *, inputs=()) -> dict[str, int | float]:
    """Write a TSV-C file: per task and matrix Uᵢ [m, k], σᵢ [k], Vᵢ [n, k]; per task the other deltas.

    A safetensors file whose metadata holds a JSON header (format, version, T, the original keys with
    shapes and dtypes, which keys are factored, and the storage accounting). Written atomically.
    Returns the storage accounting (numbers stored vs dense, file bytes).
    """
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for key, (u, s, v) in compressed.factors.items():
        for task in range(compressed.num_tasks):
            tensors[_tsvc_name(task, key, "U")] = u[task].contiguous()
            tensors[_tsvc_name(task, key, "S")] = s[task].contiguous()
            tensors[_tsvc_name(task, key, "V")] = v[task].contiguous()
    for key, delta in compressed.others.items():
        for task in range(compressed.num_tasks):
            tensors[_tsvc_name(task, key, "delta")] = delta[task].contiguous()
    storage = dict(compressed.storage())
    storage["tensor_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    storage["dense_bytes"] = compressed.num_tasks * sum(
        torch.Size(shape).numel() * compressed.dtypes[key].itemsize for key, shape in compressed.shapes.items())
    header = {"format": TSVC_FORMAT, "version": TSVC_VERSION, "num_tasks": compressed.num_tasks,
              "keys": {key: {"shape": list(shape), "dtype": str(compressed.dtypes[key]).replace("torch.", ""),
                             "kind": "factors" if key in compressed.factors else
                             "delta" if key in compressed.others else "zero",
                             **({"k": int(compressed.factors[key][0].shape[-1])} if key in compressed.factors else {})}
                       for key, shape in compressed.shapes.items()},
              "metadata": dict(compressed.metadata), "storage": storage}
    from safetensors.torch import save_file

    from .outputs import Output

    with Output(path, inputs=inputs, folder=False, what="TSV-C file") as out:
        check_space(out.staging, storage["tensor_bytes"] + (1 << 20), what=str(path))
        save_file(tensors, str(out.member(path.name)), metadata={"tsv_c": json.dumps(header), "format": "pt"})
        out.commit()
    storage["file_bytes"] = path.stat().st_size
    return storage


def read_compressed_header(path: str | os.PathLike) -> dict:
    """The JSON header of a TSV-C file (no tensors are read)."""
    path = Path(path)
    require_file(path)
    with _opened(path) as handle:
        raw = (handle.metadata() or {}).get("tsv_c")
    if raw is None:
        raise ValueError(f"{path}: not a TSV-C file (no 'tsv_c' header); create one with `tsv-fast compress`")
    try:
        header = json.loads(raw)
        if header.get("format") != TSVC_FORMAT or header.get("version", 0) > TSVC_VERSION:
            raise ValueError(f"unsupported format {header.get('format')!r} v{header.get('version')}")
        int(header["num_tasks"]), dict(header["keys"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable TSV-C header ({type(exc).__name__}: {exc})") from None
    return header


class _opened:
    """safe_open whose failures (a damaged or truncated file) are one ValueError naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        from safetensors import safe_open

        try:
            self.handle = safe_open(str(self.path), framework="pt")
            return self.handle.__enter__()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise ValueError(f"{self.path}: not a readable safetensors file ({exc})") from None

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def load_compressed(path: str | os.PathLike):
    """Read a TSV-C file written by ``save_compressed`` back into a ``CompressedTasks``."""
    path = Path(path)
    header = read_compressed_header(path)
    num_tasks = int(header["num_tasks"])
    factors, others, shapes, dtypes = {}, {}, {}, {}
    with _opened(path) as handle:
        for key, info in header["keys"].items():
            shapes[key] = tuple(info["shape"])
            dtypes[key] = parse_dtype(info["dtype"])
            if info["kind"] == "factors":
                factors[key] = tuple(torch.stack([handle.get_tensor(_tsvc_name(t, key, part))
                                                  for t in range(num_tasks)]) for part in "USV")
            elif info["kind"] == "delta":
                others[key] = torch.stack([handle.get_tensor(_tsvc_name(t, key, "delta")) for t in range(num_tasks)])
    metadata = dict(header.get("metadata", {}))
    metadata["file_bytes"] = str(path.stat().st_size)
    return CompressedTasks(factors, others, shapes, dtypes, num_tasks, metadata)


# ------------------------------------------------------------------------------------------------
# A library read lazily (merging from TSV-C) and extended in place (compress --append)
# ------------------------------------------------------------------------------------------------
class TsvcLibrary:
    """A TSV-C library read one task's tensors of one key at a time: a TSV-C file (only its header
    up front, each tensor by a positioned read, ``io.safetensors``) or a ``CompressedTasks`` in
    memory. ``keys[key]`` = {"shape", "dtype", "kind" (factors | delta | zero), "k"}; ``bytes_read``
    counts the tensor bytes read so far."""

    def __init__(self, source: str | os.PathLike | CompressedTasks):
        self.bytes_read = 0
        if isinstance(source, CompressedTasks):
            self.name, self.file, self.compressed = "the compressed tasks", None, source
            self.num_tasks, self.metadata = source.num_tasks, dict(source.metadata)
            self.keys = {key: {"shape": list(shape), "dtype": str(source.dtypes[key]).removeprefix("torch."),
                               "kind": "factors" if key in source.factors else "delta" if key in source.others
                               else "zero", **({"k": source.factors[key][0].shape[-1]} if key in source.factors else {})}
                         for key, shape in source.shapes.items()}
            return
        from .safetensors import SafetensorsCheckpoint

        header = read_compressed_header(source)
        self.name, self.compressed = str(source), None
        self.file = SafetensorsCheckpoint([Path(source)])
        self.num_tasks, self.metadata, self.keys = int(header["num_tasks"]), dict(header.get("metadata", {})), header["keys"]

    @property
    def files(self) -> list[Path]:  # what io.outputs guards against overwriting
        return [] if self.file is None else list(self.file.files)

    def read(self, task: int, key: str, part: str) -> Tensor:
        """Task ``task``'s stored U, S, V (``part``) or delta of ``key``."""
        if self.compressed is not None:
            return (self.compressed.factors[key]["USV".index(part)] if part in "USV" else self.compressed.others[key])[task]
        tensor = self.file.load(_tsvc_name(task, key, part))
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def task(self, index: int) -> LibraryTask:
        return LibraryTask(self, index)


class LibraryTask:
    """One task of a library, as a factored task (``engine.adapters``): Δ = (U σ) Vᵀ per matrix."""

    def __init__(self, library: TsvcLibrary, index: int):
        self.library, self.index = library, index
        self.name = f"{library.name} task {index}"
        self._last: tuple[str, LoraFactor | None] | None = None  # the engine asks for one key a few times

    def keys(self) -> set[str]:
        return {key for key, info in self.library.keys.items() if info["kind"] != "zero"}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.library.keys[key]["shape"])

    def factor(self, key: str) -> LoraFactor | None:
        if self._last is None or self._last[0] != key:
            found = None
            if self.library.keys.get(key, {}).get("kind") == "factors":
                u, s, v = (self.library.read(self.index, key, part) for part in "USV")
                found = LoraFactor(u * s, v.mT, 1.0, False)
            self._last = (key, found)
        return self._last[1]

    def delta(self, key: str, base: Tensor, dtype: torch.dtype) -> Tensor | None:
        if self.library.keys.get(key, {}).get("kind") != "delta":
            return None
        return self.library.read(self.index, key, "delta").to(base.device, dtype)


def append_compressed(path: str | os.PathLike, new: CompressedTasks, *, output: str | os.PathLike | None = None,
                      inputs=()) -> dict[str, int | float]:
    """Add the tasks of ``new`` (same layout, computed at the library's ranks) to the TSV-C file
    ``path``, written whole to ``output`` (default: ``path`` itself, replaced atomically). The stored
    tasks' tensors are copied byte for byte, never recomputed; where one side stores a key and the
    other does not (a key only the new task changes, or only the old ones), that side gets zeros.
    Returns the storage accounting of the new file."""
    from .outputs import Output
    from .safetensors import Shard

    path = Path(path)
    target = Path(output) if output is not None else path
    old = TsvcLibrary(path)
    header = read_compressed_header(path)
    if set(new.shapes) != set(old.keys):
        extra, missing = sorted(set(new.shapes) - set(old.keys)), sorted(set(old.keys) - set(new.shapes))
        raise ValueError(f"{path}: the new task's keys differ from the library's (missing {missing[:3]}, "
                         f"extra {extra[:3]}); is it a fine-tune of the same model?")
    storage = parse_dtype(old.metadata.get("storage_dtype", "float32"))
    total, keys = old.num_tasks + new.num_tasks, {}
    stored = tensor_bytes = 0
    # the inputs stay readable until the commit: a target equal to the library is replaced only then
    with Output(target, inputs=inputs, folder=False, what="TSV-C file") as out:
        shard = Shard(out.staging, "tsvc", 0)
        try:
            for key, info in old.keys.items():
                shape = tuple(info["shape"])
                if list(new.shapes[key]) != list(shape):
                    raise ValueError(f"key {key!r}: shape {tuple(new.shapes[key])} in the new task but {shape} "
                                     f"in {path}")
                kind_new = "factors" if key in new.factors else "delta" if key in new.others else "zero"
                kinds = {info["kind"], kind_new} - {"zero"}
                if len(kinds) > 1:
                    raise ValueError(f"key {key!r}: stored as {info['kind']} in {path} but {kind_new} for the new "
                                     "task; compress it with the library's exclude patterns")
                kind = kinds.pop() if kinds else "zero"
                k = info.get("k", 0) if info["kind"] == "factors" else new.factors[key][0].shape[-1] if kind == "factors" else 0
                parts = "USV" if kind == "factors" else ("delta",) if kind == "delta" else ()
                for part in parts:
                    part_shape = {"U": (shape[0], k), "S": (k,), "V": (shape[1], k)}.get(part, shape) if kind == "factors" else shape
                    for task in range(total):
                        if task < old.num_tasks:
                            tensor = (old.read(task, key, part) if info["kind"] == kind else
                                      torch.zeros(part_shape, dtype=storage))
                        else:
                            tensor = _new_part(new, task - old.num_tasks, key, part, kind_new, part_shape, storage)
                        shard.write(_tsvc_name(task, key, part), tensor)
                        stored += tensor.numel()
                        tensor_bytes += tensor.numel() * tensor.element_size()
                keys[key] = {**{n: info[n] for n in ("shape", "dtype")}, "kind": kind, **({"k": k} if kind == "factors" else {})}
            metadata = {**header.get("metadata", {}), "num_tasks": str(total)}
            if "models" in metadata and "models" in new.metadata:  # the names of all tasks, in order
                metadata["models"] = json.dumps([*json.loads(metadata["models"]), *json.loads(new.metadata["models"])])
            else:
                metadata.pop("models", None)
            dense = sum(torch.Size(info["shape"]).numel() for info in old.keys.values())
            dense_bytes = sum(torch.Size(info["shape"]).numel() * parse_dtype(info["dtype"]).itemsize
                              for info in old.keys.values())
            accounting = {"stored_numbers": stored, "dense_numbers": total * dense, "ratio": stored / max(total * dense, 1),
                          "tensor_bytes": tensor_bytes, "dense_bytes": total * dense_bytes}
            head = {**header, "num_tasks": total, "keys": keys, "metadata": metadata, "storage": accounting}
            shard.finish(out.member(target.name), {"tsv_c": json.dumps(head), "format": "pt"})
        except BaseException:
            shard.discard()
            raise
        out.commit()
    accounting["file_bytes"] = target.stat().st_size
    return accounting


def _new_part(new: CompressedTasks, task: int, key: str, part: str, kind: str, shape, storage: torch.dtype) -> Tensor:
    if kind == "zero":
        return torch.zeros(shape, dtype=storage)
    if kind == "delta":
        return new.others[key][task].to(storage)
    tensor = new.factors[key]["USV".index(part)][task].to(storage)
    width = shape[-1]
    if tensor.shape[-1] > width:
        raise ValueError(f"key {key!r}: the new task has {tensor.shape[-1]} triplets, the library stores {width}")
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]))
