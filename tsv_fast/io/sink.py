"""Safetensors outputs: streamed, optionally sharded, checked finite, committed whole (io.outputs).

Each tensor is appended to a data file in the output's staging folder as it arrives; ``close`` puts
the headers in front, writes the index and any extra files (configs), then commits the whole output
at once, so an interrupted or failed merge leaves nothing under the requested name and never
touches its inputs, and a re-merge leaves exactly the new model.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import Checkpoint, DictCheckpoint, Sink
from .outputs import INDEX_SUFFIX, Output
from .safetensors import Shard, check_space
from .sources import checkpoint_nbytes, open_checkpoint


class SafetensorsSink(Sink):
    """Writes tensors to ``path`` as safetensors, streaming, one tensor at a time.

    ``path`` ending in ``.safetensors`` is a file; any other path is a folder that receives
    ``model.safetensors`` (Hugging Face layout). With ``max_shard_bytes`` the output is split into
    ``<stem>-00001-of-0000N.safetensors`` files plus ``<stem>.safetensors.index.json``.

    Args:
        inputs: paths or checkpoints the run reads; an output that could touch one is refused.
        expected_bytes: size of the output if known; free disk space is checked before writing.
        out_dtype: cast floating tensors to this dtype (default: keep what the engine gives);
            floating point only.
        extra_metadata: stored in every file's header (beside what the engine passes to close).
        extra_files: {name: source path to copy, or bytes to write} put into a folder output
            (configs, tokenizer files: ``io.hf.loadable_files``), committed with the weights.
        join: the staging folder of this output opened by another process (rank 0 of a distributed
            run, ``engine.distributed``): shards are written into it, the commit is the owner's.
        tag: names this writer's shard files uniquely in a shared staging folder (e.g. its rank).
    """

    def __init__(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None,
                 inputs: Iterable[object] = (), expected_bytes: int | None = None,
                 out_dtype: torch.dtype | None = None, extra_metadata: Mapping[str, str] | None = None,
                 extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
                 join: str | os.PathLike | None = None, tag: str | None = None):
        path = Path(path)
        if out_dtype is not None and not out_dtype.is_floating_point:
            raise ValueError(f"output dtype {out_dtype} is not floating point; use float32, float16, bfloat16 "
                             "or float64")
        folder, self.stem = output_layout(path)
        self.path = path
        self.max_shard_bytes = max_shard_bytes if max_shard_bytes and max_shard_bytes > 0 else None
        self.out_dtype = out_dtype
        self.extra_metadata = dict(extra_metadata or {})
        self.extra_files = dict(extra_files or {})
        if self.extra_files and not folder:
            raise ValueError(f"output {path} is a file; configs and tokenizer files need a folder output")
        self.tag = tag or self.stem
        self.output = Output.join(join, path, folder=folder) if join is not None else Output(path, inputs=inputs,
                                                                                              folder=folder)
        if expected_bytes is not None and join is None:
            try:  # the finished files plus one shard's data file, which is copied behind its header
                check_space(self.output.staging, expected_bytes + min(expected_bytes, self.max_shard_bytes
                                                                      or expected_bytes), what=f"the output ({path})")
            except BaseException:
                self.output.abort()
                raise
        self._shards: list[Shard] = []
        self._closed = False
        self.files: list[Path] = []  # final paths, filled by close()

    def write(self, key: str, tensor: Tensor) -> None:
        if self._closed:
            raise RuntimeError("write() after close()")
        tensor = checked_output(key, tensor, self.out_dtype)
        nbytes = tensor.numel() * tensor.element_size()
        shard = self._shards[-1] if self._shards else None
        if shard is None or (self.max_shard_bytes and shard.size > 0 and shard.size + nbytes > self.max_shard_bytes):
            shard = Shard(self.output.staging, self.tag, len(self._shards))
            self._shards.append(shard)
        try:
            shard.write(key, tensor)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"disk full while writing {self.path} (key {key!r})") from exc
            raise

    def close(self, metadata: Mapping[str, str]) -> Path:
        """Finish every file in the staging folder, then commit the output whole. Returns its path
        (the index for a sharded file output)."""
        try:
            return self.commit(self.finish(metadata), metadata)
        except BaseException:
            self.abort()
            raise

    def finish(self, metadata: Mapping[str, str]) -> list[Staged]:
        """Headers in front of this writer's shards, in the staging folder under names of its tag."""
        meta = self.file_metadata(metadata)
        staged = []
        for number, shard in enumerate(self._shards):
            name = f".{self.tag}-{number:05d}.safetensors.staged"
            shard.finish(self.output.member(name), meta)
            staged.append(Staged(name, list(shard.entries), shard.size))
        self._shards = []
        return staged

    def commit(self, staged: list[Staged], metadata: Mapping[str, str]) -> Path:
        """Commit the output made of ``staged`` shards (this writer's, or all ranks' of a distributed
        run): their final names, the index, the extra files. Returns the output's path."""
        names = commit_shards(self.output, self.stem, staged, self.file_metadata(metadata), self.extra_files)
        self._closed = True
        directory = self.path if self.output.folder else self.path.parent
        self.files = [directory / name for name in names]
        if len(names) > 1 and not self.output.folder:
            return directory / (self.stem + INDEX_SUFFIX)
        return self.path

    def file_metadata(self, metadata: Mapping[str, str]) -> dict[str, str]:
        """What every file of the output (and the index) carries in its header."""
        from .. import __version__

        meta = {"format": "pt", **{str(k): str(v) for k, v in metadata.items()}, **self.extra_metadata,
                "tsv_fast_version": __version__}
        if self.out_dtype is not None:
            meta["out_dtype"] = str(self.out_dtype).removeprefix("torch.")
        return meta

    def discard(self) -> None:
        """Drop this writer's unfinished shards (the staging folder is the owner's to remove)."""
        for shard in self._shards:
            shard.discard()
        self._shards = []
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; earlier outputs and the inputs are left alone."""
        self.discard()
        self.output.abort()

    @property
    def bytes_written(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.exists())


def output_layout(path: str | os.PathLike) -> tuple[bool, str]:
    """(is a folder, file stem) of a model output: ``x.safetensors`` is a file of stem ``x``; any other
    path a folder that receives ``model.safetensors`` (Hugging Face layout)."""
    path = Path(path)
    folder = path.suffix != ".safetensors"
    return folder, ("model" if folder else path.name[: -len(".safetensors")])


@dataclass
class Staged:
    """A finished shard in a staging folder, under a temporary name: its keys and tensor bytes."""

    name: str
    keys: list[str]
    size: int


def commit_shards(output: Output, stem: str, staged: list[Staged], meta: Mapping[str, str],
                  extra_files: Mapping[str, str | os.PathLike | bytes] | None = None) -> list[str]:
    """Name the staged shards of ``output`` (``<stem>.safetensors``, or ``<stem>-0000i-of-0000N`` plus
    ``<stem>.safetensors.index.json`` when there are several), copy the extra files, commit the output
    whole. Shards without tensors are dropped unless the output would have no file. Returns the names."""
    try:
        shards = [s for s in staged if s.keys]
        if not shards:  # an output without tensors is still one (empty) file
            empty = Shard(output.staging, ".empty", 0)
            empty.finish(output.member(".empty.safetensors.staged"), meta)
            shards = [Staged(".empty.safetensors.staged", [], 0)]
        count = len(shards)
        names = ([f"{stem}.safetensors"] if count == 1 else
                 [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        for shard, name in zip(shards, names):
            os.rename(output.member(shard.name), output.member(name))
        for shard in staged:
            if not shard.keys and output.member(shard.name).exists():
                output.member(shard.name).unlink()
        if count > 1:
            index = {"metadata": {"total_size": sum(s.size for s in shards), **meta},
                     "weight_map": {key: name for shard, name in zip(shards, names) for key in shard.keys}}
            output.member(stem + INDEX_SUFFIX).write_text(json.dumps(index, indent=2))
        for name, source in (extra_files or {}).items():
            if isinstance(source, bytes):
                output.member(name).write_bytes(source)
            else:
                shutil.copyfile(source, output.member(name))
        output.commit()
    except BaseException:
        output.abort()
        raise
    return names


def checked_output(key: str, tensor: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """``tensor`` cast to ``out_dtype``, refused when it is (or the cast makes it) not finite."""
    if not tensor.is_floating_point():
        return tensor
    cast = tensor if out_dtype is None or tensor.dtype == out_dtype else tensor.to(out_dtype)
    if bool(torch.isfinite(cast).all()):
        return cast
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        raise ValueError(f"output key {key!r} {tuple(tensor.shape)} has {int(bad.sum())} NaN/Inf value(s); "
                         "nothing was written")
    overflow = ~torch.isfinite(cast)
    largest = float(tensor[overflow].abs().max())
    raise ValueError(f"output key {key!r} {tuple(tensor.shape)}: {int(overflow.sum())} value(s) overflow "
                     f"{str(out_dtype).removeprefix('torch.')} (largest |x| = {largest:.4g}, the dtype's maximum is "
                     f"{torch.finfo(out_dtype).max:.4g}); choose another --out-dtype. Nothing was written")


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
