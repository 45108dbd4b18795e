"""Safetensors outputs: streamed, optionally sharded, committed atomically.

Each tensor is appended to a hidden temporary data file as it arrives; ``close`` puts the header in
front of the data and renames the files into place, so an interrupted merge leaves no partial output
under the requested name and never touches its inputs.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import Checkpoint, DictCheckpoint, Sink
from .safetensors import Shard, check_space
from .sources import checkpoint_files, checkpoint_nbytes, open_checkpoint


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
            check_space(self.directory, expected_bytes + min(expected_bytes, self.max_shard_bytes or expected_bytes),
                         what=f"the output ({path})")
        self._tag = f"{self.stem}.{os.getpid()}.{id(self):x}"
        self._shards: list[Shard] = []
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
            shard = Shard(self.directory, self._tag, len(self._shards))
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
            self._shards.append(Shard(self.directory, self._tag, 0))
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
