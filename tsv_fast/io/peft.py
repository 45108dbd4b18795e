"""PEFT LoRA adapters in: their low-rank factors, and the exact SVD of each update from them.

A LoRA adapter adds Δ = s·B A to a weight W [out, in] (B [out, r], A [r, in]; s = lora_alpha / r,
or lora_alpha / √r with rsLoRA; Δ is transposed for ``fan_in_fan_out`` layers and embeddings). The
exact SVD of s·B A costs O((out + in)·r²): QR of B and of Aᵀ, then the SVD of the r×r core. Each
task keeps its top k = int(min(m, n)/T) triplets of that (all of them when r ≤ k, numerically zero
ones dropped as everywhere in tsv_fast), and the stacks, only Σᵢ rᵢ columns wide, go through the
same float64 orthogonalisation and reconstruction as the dense route. The merged weights therefore
equal TSV-M of the dense task vectors (tests/test_lora.py checks it against tsv_fast.reference),
computed from O(r) instead of O(min(m, n)) columns per task.

Weights the adapters replace whole (``modules_to_save``, trained biases) are task vectors like any
other: full − base. 2-D ones go through TSV, the rest is averaged, as in every tsv_fast merge.
Keys no adapter touches are copied from the base. DoRA and non-LoRA PEFT types are refused.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..reference import ZERO_RTOL
from .hf import resolve_model

F64 = torch.float64
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

# base_model.model.<module>.lora_A[.<adapter>].weight, or .lora_embedding_A[.<adapter>] for embeddings
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<kind>embedding_)?(?P<ab>[AB])(?:\.(?!weight$)[^.]+)?(?P<weight>\.weight)?$")
_PREFIX = "base_model.model."


def lowrank_svd(left: Tensor, right: Tensor, k: int,
                project_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets (U [m, k'], σ [k'], V [n, k'], k' <= min(k, K)) of Δ = L Rᵀ (L [m, K], R [n, K]),
    exactly, float64, from QR of each side and the SVD of the K×K core: O((m + n) K²), never m×n.

    Numerically zero triplets (σ <= ZERO_RTOL · σ₁) are dropped. With ``project_out`` (P [m, p],
    orthonormal columns) those of the residual (I - P Pᵀ) Δ = ((I - P Pᵀ) L) Rᵀ, judged against
    ZERO_RTOL · ‖Δ‖_F (a residual's own σ₁ can be pure rounding, see engine.sources.Chunk.task_factors).
    """
    left, right = left.to(F64), right.to(F64)
    q_right, r_right = torch.linalg.qr(right)
    scale = None if project_out is None else torch.linalg.matrix_norm(left @ r_right.mT)
    if project_out is not None:
        left = left - project_out @ (project_out.mT @ left)
    q_left, r_left = torch.linalg.qr(left)
    p, sigma, wh = torch.linalg.svd(r_left @ r_right.mT)
    k = min(k, sigma.shape[0])
    u, sigma, v = (q_left @ p)[:, :k], sigma[:k], (q_right @ wh.mT)[:, :k]
    keep = sigma > ZERO_RTOL * (sigma[:1].clamp_min(torch.finfo(F64).tiny) if scale is None else scale)
    return u[:, keep], sigma[keep], v[:, keep]


@dataclass
class LoraFactor:
    """Δ = scale · (B A), transposed when ``transposed`` (fan_in_fan_out layers, embeddings)."""

    b: Tensor
    a: Tensor
    scale: float
    transposed: bool
    embedding: bool = False  # PEFT's lora_embedding_A / _B (transposed as well)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense Δ in the base weight's layout (conv adapters: B [out, r, 1..] A [r, in, k..])."""
        delta = self.scale * (self.b.flatten(1).to(dtype) @ self.a.flatten(1).to(dtype))
        if self.a.dim() > 2:
            return delta.reshape(self.b.shape[0], *self.a.shape[1:])
        return delta.mT if self.transposed else delta

    def shape(self) -> tuple[int, ...]:
        if self.a.dim() > 2:
            return (self.b.shape[0], *self.a.shape[1:])
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transposed else (out, inp)

    def sides(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """(L [m, r], R [n, r]) in float64 with Δ = L Rᵀ in the base weight's layout."""
        left, right = self.scale * self.b.to(device, F64), self.a.to(device, F64).mT
        return (right, left) if self.transposed else (left, right)

    def svd(self, k: int, device: torch.device | None = None,
            project_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k triplets (U [m, k'], σ [k'], V [n, k'], k' <= min(k, r)) of Δ, exactly, float64;
        with ``project_out`` those of (I - P Pᵀ) Δ (see ``lowrank_svd``)."""
        return lowrank_svd(*self.sides(device), k, project_out)

    def is_zero(self) -> bool:
        """PEFT initialises B to zero: such an adapter has not changed this weight."""
        return not (bool(self.b.any()) and bool(self.a.any()))


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter, keyed by the base model's weight names.

    As a task of ``engine.adapters.AdapterTasks`` it answers ``keys()``, ``shape(key)``,
    ``factor(key)`` (its low-rank update, or None) and ``delta(key, base, dtype)`` (the task vector of
    a weight it replaces whole, or None).
    """

    name: str
    factors: dict[str, LoraFactor] = field(default_factory=dict)
    full: dict[str, Tensor] = field(default_factory=dict)  # weights the adapter replaces whole
    config: dict = field(default_factory=dict)  # its adapter_config.json

    def keys(self) -> set[str]:
        return set(self.factors) | set(self.full)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.factors[key].shape() if key in self.factors else tuple(self.full[key].shape)

    def factor(self, key: str) -> LoraFactor | None:
        return self.factors.get(key)

    def delta(self, key: str, base: Tensor, dtype: torch.dtype) -> Tensor | None:
        return self.full[key].to(base.device, dtype) - base.to(dtype) if key in self.full else None


def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (with adapter_config.json), or an adapter_model.* file beside one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return (folder / CONFIG_NAME).is_file() and (path.is_dir() or path.name in WEIGHT_NAMES)


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter (folder, its adapter_model.safetensors / .bin, or a hub id) into memory."""
    path = Path(resolve_model(path))
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (is this a PEFT adapter folder?)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON mapping of adapter settings, got {type(config).__name__}")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ValueError(f"{path}: peft_type {kind!r} is not supported; only LoRA adapters (peft_type 'LORA')")
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters rescale the weights, so their task vector is not s·B A; "
                         "merge each into its base with peft's merge_and_unload() and pass the full checkpoints")
    if config.get("lora_bias"):
        raise ValueError(f"{path}: lora_bias=True adapters are not supported")
    files = [path] if path.is_file() else [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: no {' or '.join(WEIGHT_NAMES)}")
    tensors = _read_tensors(files[0])
    return parse_adapter(tensors, config, name=str(path))


def _read_tensors(file: Path) -> dict[str, Tensor]:
    from .sources import open_checkpoint  # .bin files load with weights_only=True: pickled code is refused

    checkpoint = open_checkpoint(file)
    return {key: checkpoint.load(key) for key in checkpoint.keys()}


def parse_adapter(tensors: Mapping[str, Tensor], config: Mapping, name: str = "adapter") -> LoraAdapter:
    """Pair lora_A / lora_B tensors per module and attach each module's scale (PEFT's rules)."""
    pairs: dict[str, dict[str, Tensor]] = {}
    embedding: set[str] = set()
    adapter = LoraAdapter(name, config=dict(config))
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}: adapter tensor {key!r} {tuple(tensor.shape)} contains NaN or Inf")
        plain = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if "lora_magnitude_vector" in plain:
            raise ValueError(f"{name}: {key!r} is a DoRA magnitude; DoRA adapters are not supported")
        match = _LORA_KEY.match(plain)
        if match and (match["weight"] or match["kind"]):
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
            if match["kind"]:
                embedding.add(match["module"])
        elif ".lora_" in plain:
            raise ValueError(f"{name}: cannot interpret adapter tensor {key!r}")
        else:  # a weight the adapter replaces whole (modules_to_save; biases, of LoRA layers under base_layer)
            adapter.full[re.sub(r"\.(modules_to_save\.[^.]+|base_layer)\.", ".", plain)] = tensor
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{name}: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if rank == 0:
            raise ValueError(f"{name}: module {module!r} has rank 0 (lora_A {tuple(a.shape)}): an adapter without "
                             "a single direction; remove the module or the adapter")
        if b.dim() < 2 or b.shape[1] != rank:
            raise ValueError(f"{name}: module {module!r}: lora_A has rank {rank} but lora_B has shape {tuple(b.shape)}")
        lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8), name)
        scale = lora_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        # embeddings: PEFT stores A [r, num_embeddings], B [dim, r] and adds (B A)ᵀ
        transposed = module in embedding or bool(config.get("fan_in_fan_out"))
        adapter.factors[module + ".weight"] = LoraFactor(b, a, float(scale), transposed, module in embedding)
    return adapter


def _pattern_value(patterns: Mapping[str, float], module: str, default: float, name: str) -> float:
    """PEFT's per-module override: the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        try:
            matched = re.fullmatch(rf"(.*\.)?(?:{pattern})", module)
        except re.error as exc:
            raise ValueError(f"{name}: alpha_pattern {pattern!r} is not a valid regular expression ({exc})") from None
        if matched:
            return value
    return default
