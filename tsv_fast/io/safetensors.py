"""The safetensors format, read and written by hand so that merges stream.

Reading: only the JSON header is read up front; each tensor is then read with one positioned read
into a fresh buffer (a memory map would keep every page it touched resident, which defeats the
streaming bound). Writing: tensors are appended to a data file as they arrive and the header is
put in front when the file is finished (``Shard``). The header parser refuses anything that is not
a well-formed safetensors header with a ValueError naming the file (tests/test_safetensors_fuzz.py).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import Checkpoint

# safetensors dtype codes <-> torch dtypes
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


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
            require_file(file)
            entries, metadata = read_header(file)
            self._metadata.update(metadata)
            for key, entry in entries.items():
                if key in self._entries:
                    raise ValueError(f"{self.name}: key {key!r} appears in more than one shard")
                self._entries[key] = (file, *entry)

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


def read_header(file: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype, int, int]], dict[str, str]]:
    """The tensors of a safetensors file, key -> (shape, dtype, start, end) with absolute byte offsets,
    and its metadata. Anything else than a well-formed header is a ValueError naming the file: a
    length beyond the file, JSON that is not a mapping of entries, unknown dtypes, shapes that are
    not lists of non-negative integers, offsets outside the data or not matching the shape."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: not a safetensors file (too short)")
        length = int.from_bytes(raw, "little")
        if length > min(size - 8, 100 << 20):
            raise ValueError(f"{file}: not a safetensors file (bad header length {length} for {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{file}: not a safetensors file (unreadable header: {type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a safetensors file (header is not a mapping)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{file}: bad safetensors header (__metadata__ must map strings to strings)")
    data_start, data_size = 8 + length, size - 8 - length
    entries = {}
    for key, info in header.items():
        entries[key] = _entry(file, key, info, data_size)
        entries[key] = (*entries[key][:2], data_start + entries[key][2], data_start + entries[key][3])
    return entries, metadata


def _entry(file: Path, key: str, info: object, data_size: int) -> tuple[tuple[int, ...], torch.dtype, int, int]:
    """(shape, dtype, start, end) of one header entry, offsets relative to the data section."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{file}: bad safetensors header for key {key!r} ({what})")

    if not isinstance(info, dict):
        raise bad("not a mapping")
    dtype = CODE_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise bad(f"unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 48 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} are not two increasing non-negative integers")
    if offsets[1] > data_size:
        raise ValueError(f"{file}: truncated (key {key!r} ends at byte {offsets[1]} of the data, "
                         f"which has {data_size})")
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != offsets[1] - offsets[0]:
        raise bad(f"shape {shape} of {str(dtype).removeprefix('torch.')} needs {numel * dtype.itemsize} bytes, "
                  f"the offsets give {offsets[1] - offsets[0]}")
    return tuple(shape), dtype, offsets[0], offsets[1]


def require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")



def _tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _header_bytes(entries: Mapping[str, tuple[str, list[int], int, int]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    for key, (code, shape, start, end) in entries.items():
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # pad to 8 bytes, as the safetensors writer does


class Shard:
    """One output file being written: its data goes to a temporary file, the header comes at close."""

    def __init__(self, directory: Path, tag: str, number: int):
        self.data_path = directory / f".{tag}-shard{number:05d}.data.tmp"
        self.file = open(self.data_path, "wb")
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}
        self.size = 0

    def write(self, key: str, tensor: Tensor) -> None:
        data = _tensor_bytes(tensor)
        self.file.write(data)
        code = DTYPE_CODES.get(tensor.dtype)
        if code is None:
            raise ValueError(f"key {key!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        self.entries[key] = (code, list(tensor.shape), self.size, self.size + data.nbytes)
        self.size += data.nbytes

    def finish(self, target: Path, metadata: Mapping[str, str]) -> None:
        """Header + data into ``target`` (a temporary name); the data file is removed."""
        self.file.close()
        header = _header_bytes(self.entries, metadata)
        check_space(target.parent, len(header) + self.size, what=f"shard {target.name}")
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


def check_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"not enough disk space in {directory} for {what}: need "
                      f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")


