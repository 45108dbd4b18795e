"""Checkpoints as the merge engine sees them: named tensors read one key at a time.

A ``Checkpoint`` answers ``keys()``, ``shape(key)``, ``dtype(key)`` and ``load(key)``; the engine never
asks for more than one group of keys at once, so a file-backed checkpoint (``io.sources``) streams.
A ``Sink`` receives outputs key by key. The in-memory versions live here.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Checkpoint:
    """Read-only named tensors. Subclasses implement the four accessors."""

    name: str = "checkpoint"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def load(self, key: str) -> Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class DictCheckpoint(Checkpoint):
    """A state dict (or an nn.Module's) held in memory. Tensors are never modified."""

    def __init__(self, tensors: Mapping[str, Tensor], name: str = "state dict"):
        self.tensors = tensors
        self.name = name

    def keys(self) -> list[str]:
        return list(self.tensors.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def load(self, key: str) -> Tensor:
        return self.tensors[key]

    @property
    def device(self) -> torch.device:
        for tensor in self.tensors.values():
            return tensor.device
        return torch.device("cpu")


def as_checkpoint(source: object, name: str) -> Checkpoint:
    """A Checkpoint for a state dict, an nn.Module, a Checkpoint or a path (file or model folder)."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, nn.Module):
        return DictCheckpoint(source.state_dict(), name=f"{name} ({type(source).__name__})")
    if isinstance(source, Mapping):
        for key, value in source.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{name}: key {key!r} holds a {type(value).__name__}, not a tensor")
        return DictCheckpoint(source, name=name)
    if isinstance(source, (str, os.PathLike)):
        from .sources import open_checkpoint  # file formats load only when a path is given

        return open_checkpoint(source)
    raise TypeError(f"{name}: expected a state dict, an nn.Module or a checkpoint path, got {type(source).__name__}")


@dataclass
class LowRank:
    """A matrix update kept factored, as a method hands it to a sink that stores factors (a LoRA
    adapter): update = left @ rightᵀ, left [m, K], right [n, K] (float64, α applied)."""

    left: Tensor
    right: Tensor

    def to(self, device: torch.device) -> LowRank:
        return LowRank(self.left.to(device), self.right.to(device))


class Sink:
    """Receives outputs one key at a time (a tensor, or a ``LowRank`` update where the run asked for
    factored outputs); ``close`` returns what the caller gets back."""

    def write(self, key: str, tensor: Tensor) -> None:
        raise NotImplementedError

    def close(self, metadata: Mapping[str, str]) -> object:
        raise NotImplementedError

    def abort(self) -> None:
        """Called when the merge fails: drop anything partial."""


class DictSink(Sink):
    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def write(self, key: str, tensor: Tensor) -> None:
        self.tensors[key] = tensor

    def close(self, metadata: Mapping[str, str]) -> dict[str, Tensor]:
        return self.tensors
