"""Checkpoint sources: safetensors files (single or sharded), Hugging Face folders, torch .pt/.bin.

Every source is lazy where its format allows: a safetensors checkpoint reads one tensor per
``load(key)``, so the engine holds one group of layers per task at a time, never whole models.
Torch files load with ``weights_only=True``; a file that needs real unpickling (whole pickled
modules) loads only with an explicit ``allow_pickle=True``.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import Checkpoint, DictCheckpoint
from .hf import resolve_model
from .safetensors import SafetensorsCheckpoint, require_file

INDEX_NAME = "model.safetensors.index.json"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"

# Keys under which training scripts nest the real state dict ({"state_dict": {...}, "epoch": 3}).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "params")

PICKLE_RISK = ("unpickling runs arbitrary Python code from the file: a malicious or corrupted "
               "checkpoint can execute anything with your permissions")


class TorchCheckpoint(DictCheckpoint):
    """A torch state dict file. Loaded with mmap where the format allows, so tensors page in lazily."""

    def __init__(self, tensors: Mapping[str, Tensor], files: Sequence[Path], name: str):
        super().__init__(tensors, name=name)
        self.files = list(files)


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """A lazy Checkpoint for a safetensors file, a model folder, a torch ``.pt``/``.bin`` file or a
    Hugging Face model id ``org/name[@revision]`` (``io.hf.resolve_model``; a path that exists wins).

    Folders: ``model.safetensors.index.json`` (sharded), a single ``*.safetensors`` file,
    ``pytorch_model.bin.index.json`` or a single ``.bin``/``.pt``. Torch files load with
    ``weights_only=True``; files that need unpickling of code (whole pickled modules, as the
    task-arithmetic and TSV papers publish) load only with ``allow_pickle=True``.
    """
    path = Path(resolve_model(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _open_folder(path, allow_pickle)
    if path.name.endswith(".index.json"):
        return _open_index(path, allow_pickle)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint([path])
    return _open_torch([path], str(path), allow_pickle)



def _open_folder(folder: Path, allow_pickle: bool) -> Checkpoint:
    for index in (folder / INDEX_NAME, folder / TORCH_INDEX_NAME):
        if index.is_file():
            return _with_folder(_open_index(index, allow_pickle, name=str(folder)), folder)
    single = sorted(folder.glob("*.safetensors"))
    if len(single) == 1:
        return _with_folder(SafetensorsCheckpoint(single, name=str(folder)), folder)
    torch_files = sorted([*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
    if not single and len(torch_files) == 1:
        return _with_folder(_open_torch(torch_files, str(folder), allow_pickle), folder)
    found = [p.name for p in [*single, *torch_files]]
    raise ValueError(f"{folder}: cannot tell which file holds the model (found {found or 'no weight files'}); "
                     f"expected {INDEX_NAME}, a single .safetensors file or a single .bin/.pt file")


def _with_folder(ckpt: Checkpoint, folder: Path) -> Checkpoint:
    ckpt.folder = folder  # an input model folder: outputs may not be written inside it (io.outputs)
    return ckpt


def _open_index(index: Path, allow_pickle: bool, name: str | None = None) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{index}: not a valid shard index (needs a 'weight_map')") from exc
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    for file in files:
        require_file(file)
    if all(f.suffix == ".safetensors" for f in files):
        return _with_folder(SafetensorsCheckpoint(files, name=name or str(index.parent)), index.parent)
    return _with_folder(_open_torch(files, name or str(index.parent), allow_pickle), index.parent)


def _open_torch(files: Sequence[Path], name: str, allow_pickle: bool) -> Checkpoint:
    tensors: dict[str, Tensor] = {}
    for file in files:
        for key, value in _load_torch_file(file, allow_pickle).items():
            if key in tensors:
                raise ValueError(f"{name}: key {key!r} appears in more than one shard")
            tensors[key] = value
    return TorchCheckpoint(tensors, files, name)


def _load_torch_file(file: Path, allow_pickle: bool) -> dict[str, Tensor]:
    require_file(file)
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


def checkpoint_nbytes(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors of ``ckpt`` take (floating keys cast to ``dtype`` if given)."""
    total = 0
    for key in ckpt.keys():
        kept = ckpt.dtype(key)
        if dtype is not None and kept.is_floating_point:
            kept = dtype
        total += torch.Size(ckpt.shape(key)).numel() * kept.itemsize
    return total


