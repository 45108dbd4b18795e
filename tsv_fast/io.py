"""Checkpoint files in and out: safetensors (single or sharded), Hugging Face folders, torch .pt/.bin.

Sources are lazy: a safetensors checkpoint reads one tensor per ``load(key)``, so the merge engine
holds one group of layers per task at a time, never whole models. The sink streams too: each tensor
is appended to a hidden temporary file as it arrives; ``close`` writes the safetensors header in
front of the data and renames every file into place, so an interrupted merge leaves no partial
output under the requested name and never touches its inputs.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import Checkpoint, DictCheckpoint, Sink

INDEX_NAME = "model.safetensors.index.json"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TSVC_FORMAT = "tsv-c"
TSVC_VERSION = 1

# safetensors dtype codes <-> torch dtypes
_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

# Keys under which training scripts nest the real state dict ({"state_dict": {...}, "epoch": 3}).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "params")

PICKLE_RISK = ("unpickling runs arbitrary Python code from the file: a malicious or corrupted "
               "checkpoint can execute anything with your permissions")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / 'torch.float32' / torch.float16 -> torch dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
               "bf16": "bfloat16", "fp64": "float64", "f64": "float64", "double": "float64", "float": "float32"}
    key = str(name).lower().removeprefix("torch.")
    key = aliases.get(key, key)
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return dtype


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (a sharded model), read one tensor per ``load(key)``.

    Only the headers are read up front. By default each tensor is read with a positioned read
    into a fresh buffer: a memory map (``safe_open``) keeps every page it touched counted in the
    process's resident memory (measured: 0.9 GB left mapped after one pass over 3.2 GB of
    checkpoints), which would defeat the streaming bound. ``mmap=True`` uses ``safe_open``.
    """

    def __init__(self, files: Sequence[str | os.PathLike], name: str | None = None, *, mmap: bool = False):
        self.files = [Path(f) for f in files]
        self.name = name or str(self.files[0])
        self.mmap = mmap
        # key -> (file, shape, dtype, start, end), offsets absolute in the file
        self._entries: dict[str, tuple[Path, tuple[int, ...], torch.dtype, int, int]] = {}
        self._metadata: dict[str, str] = {}
        self._handles: dict[Path, object] = {}
        for file in self.files:
            _require_file(file)
            header, data_start = _read_header(file)
            self._metadata.update(header.pop("__metadata__", None) or {})
            size = file.stat().st_size
            for key, info in header.items():
                if key in self._entries:
                    raise ValueError(f"{self.name}: key {key!r} appears in more than one shard")
                if info.get("dtype") not in _CODE_DTYPES:
                    raise ValueError(f"{file}: key {key!r} has unsupported dtype {info.get('dtype')}")
                start, end = (data_start + int(o) for o in info["data_offsets"])
                if end > size:
                    raise ValueError(f"{file}: truncated (key {key!r} ends at byte {end}, file has {size})")
                self._entries[key] = (file, tuple(info["shape"]), _CODE_DTYPES[info["dtype"]], start, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][2]

    def load(self, key: str) -> Tensor:
        file, shape, dtype, start, end = self._entries[key]
        if self.mmap:
            return self._safe_open(file).get_tensor(key)
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(file, "rb", buffering=0) as f:
            f.seek(start)
            got = f.readinto(view)
        if got != end - start:
            raise ValueError(f"{file}: short read for key {key!r} ({got} of {end - start} bytes)")
        return out

    def _safe_open(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)


def _read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(file, "rb") as f:
        raw = f.read(8)
        size = file.stat().st_size
        if len(raw) < 8:
            raise ValueError(f"{file}: not a safetensors file (too short)")
        length = int.from_bytes(raw, "little")
        if length > min(size - 8, 100 << 20):
            raise ValueError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ValueError(f"{file}: not a safetensors file (unreadable header)") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a safetensors file (header is not a mapping)")
    return header, 8 + length


class TorchCheckpoint(DictCheckpoint):
    """A torch state dict file. Loaded with mmap where the format allows, so tensors page in lazily."""

    def __init__(self, tensors: Mapping[str, Tensor], files: Sequence[Path], name: str):
        super().__init__(tensors, name=name)
        self.files = list(files)


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """A lazy Checkpoint for a safetensors file, a model folder or a torch ``.pt``/``.bin`` file.

    Folders: ``model.safetensors.index.json`` (sharded), a single ``*.safetensors`` file,
    ``pytorch_model.bin.index.json`` or a single ``.bin``/``.pt``. Torch files load with
    ``weights_only=True``; files that need unpickling of code (whole pickled modules, as the
    task-arithmetic and TSV papers publish) load only with ``allow_pickle=True``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _open_folder(path, allow_pickle)
    if path.name.endswith(".index.json"):
        return _open_index(path, allow_pickle)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint([path])
    return _open_torch([path], str(path), allow_pickle)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")


def _open_folder(folder: Path, allow_pickle: bool) -> Checkpoint:
    for index in (folder / INDEX_NAME, folder / TORCH_INDEX_NAME):
        if index.is_file():
            return _open_index(index, allow_pickle, name=str(folder))
    single = sorted(folder.glob("*.safetensors"))
    if len(single) == 1:
        return SafetensorsCheckpoint(single, name=str(folder))
    torch_files = sorted([*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
    if not single and len(torch_files) == 1:
        return _open_torch(torch_files, str(folder), allow_pickle)
    found = [p.name for p in [*single, *torch_files]]
    raise ValueError(f"{folder}: cannot tell which file holds the model (found {found or 'no weight files'}); "
                     f"expected {INDEX_NAME}, a single .safetensors file or a single .bin/.pt file")


def _open_index(index: Path, allow_pickle: bool, name: str | None = None) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{index}: not a valid shard index (needs a 'weight_map')") from exc
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    for file in files:
        _require_file(file)
    if all(f.suffix == ".safetensors" for f in files):
        return SafetensorsCheckpoint(files, name=name or str(index.parent))
    return _open_torch(files, name or str(index.parent), allow_pickle)


def _open_torch(files: Sequence[Path], name: str, allow_pickle: bool) -> Checkpoint:
    tensors: dict[str, Tensor] = {}
    for file in files:
        for key, value in _load_torch_file(file, allow_pickle).items():
            if key in tensors:
                raise ValueError(f"{name}: key {key!r} appears in more than one shard")
            tensors[key] = value
    return TorchCheckpoint(tensors, files, name)


def _load_torch_file(file: Path, allow_pickle: bool) -> dict[str, Tensor]:
    _require_file(file)
    if allow_pickle:
        warnings.warn(f"{file}: loading with allow_pickle=True; {PICKLE_RISK}. Only do this for files "
                      f"from a source you trust, and convert them once with `tsv-fast convert`.", stacklevel=4)
        obj = _torch_load(file, weights_only=False)
    else:
        try:
            obj = _torch_load(file, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{file} contains pickled Python objects (e.g. a whole nn.Module), not just tensors; "
                f"refusing to unpickle it because {PICKLE_RISK}. If you trust the file, pass "
                f"allow_pickle=True (command line: --allow-pickle), or better convert it once with "
                f"`tsv-fast convert {file} out.safetensors --allow-pickle`. ({str(exc).splitlines()[0]})") from exc
    return _state_dict_of(obj, file)


def _torch_load(file: Path, weights_only: bool):
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        # The legacy (pre-zipfile) format cannot be memory-mapped: read it whole.
        if "mmap" not in str(exc) and "zip" not in str(exc):
            raise
        return torch.load(file, map_location="cpu", weights_only=weights_only)


def _state_dict_of(obj: object, file: Path) -> dict[str, Tensor]:
    """The tensors of a loaded torch object: a module, a state dict, or one nested under 'state_dict'."""
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise ValueError(f"{file}: holds a {type(obj).__name__}, not a state dict or a module")
    if not any(isinstance(v, Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:
            if key in obj and isinstance(obj[key], (Mapping, torch.nn.Module)):
                return _state_dict_of(obj[key], file)
    non_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise ValueError(f"{file}: entries {non_tensors[:5]} are not tensors; expected a flat state dict "
                         f"(key -> tensor) or one nested under one of {list(_NESTED_KEYS)}")
    return dict(obj)


def checkpoint_files(source: object) -> list[Path]:
    """The files a source reads (empty for in-memory sources)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return [p for p in path.iterdir() if p.is_file()]
        return [path]
    return list(getattr(source, "files", []))


def checkpoint_nbytes(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors of ``ckpt`` take (floating keys cast to ``dtype`` if given)."""
    total = 0
    for key in ckpt.keys():
        kept = ckpt.dtype(key)
        if dtype is not None and kept.is_floating_point:
            kept = dtype
        total += torch.Size(ckpt.shape(key)).numel() * kept.itemsize
    return total


# ------------------------------------------------------------------------------------------------
# Sink: streamed, atomic, optionally sharded safetensors
# ------------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _header_bytes(entries: Mapping[str, tuple[str, list[int], int, int]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    for key, (code, shape, start, end) in entries.items():
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # pad to 8 bytes, as the safetensors writer does


class _Shard:
    """One output file being written: its data goes to a temporary file, the header comes at close."""

    def __init__(self, directory: Path, tag: str, number: int):
        self.data_path = directory / f".{tag}-shard{number:05d}.data.tmp"
        self.file = open(self.data_path, "wb")
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}
        self.size = 0

    def write(self, key: str, tensor: Tensor) -> None:
        data = _tensor_bytes(tensor)
        self.file.write(data)
        code = _DTYPE_CODES.get(tensor.dtype)
        if code is None:
            raise ValueError(f"key {key!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        self.entries[key] = (code, list(tensor.shape), self.size, self.size + data.nbytes)
        self.size += data.nbytes

    def finish(self, target: Path, metadata: Mapping[str, str]) -> None:
        """Header + data into ``target`` (a temporary name); the data file is removed."""
        self.file.close()
        header = _header_bytes(self.entries, metadata)
        _check_space(target.parent, len(header) + self.size, what=f"shard {target.name}")
        with open(target, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self.data_path.unlink()

    def discard(self) -> None:
        self.file.close()
        self.data_path.unlink(missing_ok=True)


def _check_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"not enough disk space in {directory} for {what}: need "
                      f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")


class SafetensorsSink(Sink):
    """Writes merged tensors to ``path`` as safetensors, streaming, one tensor at a time.

    ``path`` ending in ``.safetensors`` is a file; any other path is a folder that receives
    ``model.safetensors`` (Hugging Face layout). With ``max_shard_bytes`` the output is split into
    ``<stem>-00001-of-0000N.safetensors`` files plus ``<stem>.safetensors.index.json``.
    Everything is written under hidden temporary names and renamed only when complete.

    Args:
        inputs: paths or checkpoints the merge reads; writing over any of them is refused.
        expected_bytes: size of the output if known; free disk space is checked before writing.
        out_dtype: cast floating tensors to this dtype (default: keep what the engine gives).
        extra_metadata: stored in every file's header (beside what the engine passes to close).
    """

    def __init__(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None,
                 inputs: Iterable[object] = (), expected_bytes: int | None = None,
                 out_dtype: torch.dtype | None = None, extra_metadata: Mapping[str, str] | None = None):
        path = Path(path)
        if path.suffix == ".safetensors":
            self.directory, self.stem = path.parent, path.name[: -len(".safetensors")]
        else:
            self.directory, self.stem = path, "model"
        self.path = path
        self.max_shard_bytes = max_shard_bytes if max_shard_bytes and max_shard_bytes > 0 else None
        self.out_dtype = out_dtype
        self.extra_metadata = dict(extra_metadata or {})
        self._refuse_inputs(inputs)
        self.directory.mkdir(parents=True, exist_ok=True)
        if expected_bytes is not None:
            # Room for the finished files plus one shard's temporary data file.
            _check_space(self.directory, expected_bytes + min(expected_bytes, self.max_shard_bytes or expected_bytes),
                         what=f"the output ({path})")
        self._tag = f"{self.stem}.{os.getpid()}.{id(self):x}"
        self._shards: list[_Shard] = []
        self._done: list[Path] = []   # finished shards under temporary names
        self._closed = False
        self.files: list[Path] = []   # final paths, filled by close()

    def _refuse_inputs(self, inputs: Iterable[object]) -> None:
        outputs = {self._single_path().resolve(), (self.directory / f"{self.stem}.safetensors.index.json").resolve()}
        for source in inputs:
            for file in checkpoint_files(source):
                resolved = Path(file).resolve()
                is_our_shard = (resolved.parent == self.directory.resolve() and resolved.suffix == ".safetensors"
                                and resolved.name.startswith(f"{self.stem}-"))
                if resolved in outputs or is_our_shard:
                    raise ValueError(f"output {self.path} would overwrite input {file}; choose another output path")

    def _single_path(self) -> Path:
        return self.directory / f"{self.stem}.safetensors"

    def write(self, key: str, tensor: Tensor) -> None:
        if self._closed:
            raise RuntimeError("write() after close()")
        if self.out_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.out_dtype)
        nbytes = tensor.numel() * tensor.element_size()
        shard = self._shards[-1] if self._shards else None
        if shard is None or (self.max_shard_bytes and shard.size > 0 and shard.size + nbytes > self.max_shard_bytes):
            shard = _Shard(self.directory, self._tag, len(self._shards))
            self._shards.append(shard)
        try:
            shard.write(key, tensor)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"disk full while writing {self.path} (key {key!r})") from exc
            raise

    def close(self, metadata: Mapping[str, str]) -> Path:
        """Finish every file, then rename them into place (index last). Returns the output path."""
        meta = {"format": "pt", **{str(k): str(v) for k, v in metadata.items()}, **self.extra_metadata}
        if self.out_dtype is not None:
            meta["out_dtype"] = str(self.out_dtype).replace("torch.", "")
        if not self._shards:
            self._shards.append(_Shard(self.directory, self._tag, 0))
        count = len(self._shards)
        names = ([f"{self.stem}.safetensors"] if count == 1 else
                 [f"{self.stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        try:
            for shard, name in zip(self._shards, names):
                temp = self.directory / f".{name}.{self._tag}.tmp"
                self._done.append(temp)
                shard.finish(temp, meta)
            index_temp = None
            if count > 1:
                index = {"metadata": {"total_size": sum(s.size for s in self._shards), **meta},
                         "weight_map": {key: name for shard, name in zip(self._shards, names)
                                        for key in shard.entries}}
                index_temp = self.directory / f".{self.stem}.index.{self._tag}.tmp"
                index_temp.write_text(json.dumps(index, indent=2))
                self._done.append(index_temp)
            for temp, name in zip(self._done, names):
                os.replace(temp, self.directory / name)
            if index_temp is not None:
                os.replace(index_temp, self.directory / f"{self.stem}.safetensors.index.json")
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.files = [self.directory / name for name in names]
        return self.path if count == 1 or self.path.suffix != ".safetensors" else \
            self.directory / f"{self.stem}.safetensors.index.json"

    def abort(self) -> None:
        """Remove every temporary file; finished outputs of earlier runs are left alone."""
        for shard in self._shards:
            shard.discard()
        for temp in self._done:
            temp.unlink(missing_ok=True)
        self._shards, self._done = [], []
        self._closed = True

    @property
    def bytes_written(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.exists())


# ------------------------------------------------------------------------------------------------
# TSV-C files
# ------------------------------------------------------------------------------------------------
def _tsvc_name(task: int, key: str, part: str) -> str:
    return f"task{task}::{key}::{part}"


def save_compressed(path: str | os.PathLike, compressed) -> dict[str, int | float]:
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

    path.parent.mkdir(parents=True, exist_ok=True)
    _check_space(path.parent, storage["tensor_bytes"] + (1 << 20), what=str(path))
    temp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(temp), metadata={"tsv_c": json.dumps(header), "format": "pt"})
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    storage["file_bytes"] = path.stat().st_size
    return storage


def read_compressed_header(path: str | os.PathLike) -> dict:
    """The JSON header of a TSV-C file (no tensors are read)."""
    from safetensors import safe_open

    path = Path(path)
    _require_file(path)
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("tsv_c")
    if raw is None:
        raise ValueError(f"{path}: not a TSV-C file (no 'tsv_c' header); create one with `tsv-fast compress`")
    header = json.loads(raw)
    if header.get("format") != TSVC_FORMAT or header.get("version", 0) > TSVC_VERSION:
        raise ValueError(f"{path}: unsupported TSV-C format {header.get('format')!r} v{header.get('version')}")
    return header


def load_compressed(path: str | os.PathLike):
    """Read a TSV-C file written by ``save_compressed`` back into a ``CompressedTasks``."""
    from safetensors import safe_open

    from .tsvc import CompressedTasks

    path = Path(path)
    header = read_compressed_header(path)
    num_tasks = int(header["num_tasks"])
    factors, others, shapes, dtypes = {}, {}, {}, {}
    with safe_open(str(path), framework="pt") as handle:
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
# Conversion and small helpers
# ------------------------------------------------------------------------------------------------
def save_checkpoint(tensors: Mapping[str, Tensor] | Checkpoint, path: str | os.PathLike, *,
                    max_shard_bytes: int | None = None, metadata: Mapping[str, str] | None = None,
                    inputs: Iterable[object] = ()) -> Path:
    """Stream a state dict or Checkpoint to safetensors through SafetensorsSink (atomic, shardable)."""
    source = tensors if isinstance(tensors, Checkpoint) else DictCheckpoint(tensors, name="state dict")
    sink = SafetensorsSink(path, max_shard_bytes=max_shard_bytes, inputs=inputs,
                           expected_bytes=checkpoint_nbytes(source))
    try:
        for key in source.keys():
            sink.write(key, source.load(key))
        return sink.close(metadata or {})
    except BaseException:
        sink.abort()
        raise


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, allow_pickle: bool = False,
            max_shard_bytes: int | None = None) -> Path:
    """Any readable checkpoint (e.g. a pickled .pt) -> safetensors, so later runs never unpickle."""
    source = open_checkpoint(src, allow_pickle=allow_pickle)
    return save_checkpoint(source, dst, max_shard_bytes=max_shard_bytes, inputs=[src],
                           metadata={"converted_from": Path(src).name})
