"""PEFT LoRA adapters: TSV-M of T adapters of one base model without forming their dense deltas.

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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import Checkpoint, DictSink, Sink, as_checkpoint
from .merge import LayerReport, Options, Report, _load_checked, backend_for, merge_stacks
from .reference import ZERO_RTOL, is_merged_as_matrix, warn_zero_rank

F64 = torch.float64
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

# base_model.model.<module>.lora_A[.<adapter>].weight, or .lora_embedding_A[.<adapter>] for embeddings
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<kind>embedding_)?(?P<ab>[AB])(?:\.(?!weight$)[^.]+)?(?P<weight>\.weight)?$")
_PREFIX = "base_model.model."


@dataclass
class LoraFactor:
    """Δ = scale · (B A), transposed when ``transposed`` (fan_in_fan_out layers, embeddings)."""

    b: Tensor
    a: Tensor
    scale: float
    transposed: bool

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

    def svd(self, k: int, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k triplets (U [m, k'], σ [k'], V [n, k'], k' <= min(k, r)) of Δ, exactly, float64."""
        qb, rb = torch.linalg.qr(self.b.to(device, F64))
        qa, ra = torch.linalg.qr(self.a.to(device, F64).mT)
        p, sigma, wh = torch.linalg.svd(self.scale * (rb @ ra.mT))
        left, right = qb @ p, qa @ wh.mT
        if self.transposed:
            left, right = right, left
        k = min(k, sigma.shape[0])
        left, sigma, right = left[:, :k], sigma[:k], right[:, :k]
        keep = sigma > ZERO_RTOL * sigma[:1].clamp_min(torch.finfo(F64).tiny)
        return left[:, keep], sigma[keep], right[:, keep]


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter, keyed by the base model's weight names."""

    name: str
    factors: dict[str, LoraFactor] = field(default_factory=dict)
    full: dict[str, Tensor] = field(default_factory=dict)  # weights the adapter replaces whole

    def keys(self) -> set[str]:
        return set(self.factors) | set(self.full)


def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (with adapter_config.json), or an adapter_model.* file beside one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return (folder / CONFIG_NAME).is_file() and (path.is_dir() or path.name in WEIGHT_NAMES)


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter (folder, or its adapter_model.safetensors / .bin) into memory."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (is this a PEFT adapter folder?)")
    config = json.loads(config_file.read_text())
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
    from .io import open_checkpoint  # .bin files load with weights_only=True: pickled code is refused

    checkpoint = open_checkpoint(file)
    return {key: checkpoint.load(key) for key in checkpoint.keys()}


def parse_adapter(tensors: Mapping[str, Tensor], config: Mapping, name: str = "adapter") -> LoraAdapter:
    """Pair lora_A / lora_B tensors per module and attach each module's scale (PEFT's rules)."""
    pairs: dict[str, dict[str, Tensor]] = {}
    embedding: set[str] = set()
    adapter = LoraAdapter(name)
    for key, tensor in tensors.items():
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
        else:  # a weight the adapter replaces whole (modules_to_save, biases)
            adapter.full[re.sub(r"\.modules_to_save\.[^.]+\.", ".", plain)] = tensor
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{name}: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ValueError(f"{name}: module {module!r}: lora_A has rank {rank} but lora_B has shape {tuple(b.shape)}")
        lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scale = lora_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        # embeddings: PEFT stores A [r, num_embeddings], B [dim, r] and adds (B A)ᵀ
        transposed = module in embedding or bool(config.get("fan_in_fan_out"))
        adapter.factors[module + ".weight"] = LoraFactor(b, a, float(scale), transposed)
    return adapter


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


# ------------------------------------------------------------------------------------------------
# The merge
# ------------------------------------------------------------------------------------------------
def lora_tsv_merge(pretrained, adapters: Sequence, *, alpha: float = 1.0, rank_fraction: float | None = None,
                   exclude: Sequence[str] = ("text_projection",), backend: str = "auto",
                   device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.float32,
                   min_rank: int = 0, rank_overrides: Mapping[str, float | int] | None = None,
                   sink: Sink | None = None, progress: bool = False, return_report: bool = False):
    """Merged weights W_pre + α·M from a base model and T LoRA adapters of it.

    ``adapters``: adapter folders / files (PEFT format) or LoraAdapter objects. Other options as
    in tsv_fast.tsv_merge; the result equals ``tsv_merge(pretrained, [base with adapter i merged
    in])`` computed in float64, without ever forming the dense task vectors of LoRA weights.

    Example:
        >>> merged = lora_tsv_merge("llama-7b/", ["lora-math/", "lora-code/", "lora-chat/"])
    """
    started = time.perf_counter()
    options = Options(rank_fraction, rank_overrides, exclude, min_rank, compute_dtype, backend, device,
                      progress=progress)
    base = as_checkpoint(pretrained, "the pretrained checkpoint")
    tasks = [a if isinstance(a, LoraAdapter) else load_adapter(a) for a in adapters]
    if not tasks:
        raise ValueError("need at least one LoRA adapter")
    _check_against_base(base, tasks)
    dev = torch.device(device) if device is not None else base.device
    backend_impl = backend_for(options, dev)
    report = Report(backend=backend_impl.name, num_tasks=len(tasks))
    sink = sink or DictSink()
    touched = set().union(*(t.keys() for t in tasks))
    zero_rank = []
    from tqdm.auto import tqdm

    try:
        for key in tqdm(base.keys(), disable=not progress, unit="key", desc="tsv-lora"):
            if key not in touched or not base.dtype(key).is_floating_point:
                sink.write(key, _load_checked(base, key).clone())
                continue
            weight = _load_checked(base, key, dev)
            shape = tuple(weight.shape)
            k = options.rank(key, shape, len(tasks)) if is_merged_as_matrix(key, shape, options.exclude) else None
            if k is None:
                report.averaged.append(key)
                sink.write(key, _averaged(weight, tasks, key, alpha, compute_dtype).to(base.device))
            elif k == 0:
                zero_rank.append(key)
                sink.write(key, weight.clone())
            else:
                merged, layer = _tsv_layer(backend_impl, weight, tasks, key, k, alpha, compute_dtype)
                report.layers[key] = layer
                sink.write(key, merged.to(base.device))
        warn_zero_rank(zero_rank)
        report.zero_rank = zero_rank
        report.seconds = time.perf_counter() - started
        from . import __version__

        result = sink.close({"method": "tsv-m-lora", "output": "weights", "num_tasks": str(len(tasks)),
                             "alpha": str(alpha), "rank_fraction": str(rank_fraction or f"1/{len(tasks)}"),
                             "compute_dtype": str(compute_dtype).replace("torch.", ""),
                             "tsv_fast_version": __version__})
    except BaseException:
        sink.abort()
        raise
    return (result, report) if return_report else result


def _check_against_base(base: Checkpoint, tasks: Sequence[LoraAdapter]) -> None:
    names = set(base.keys())
    for task in tasks:
        for key in sorted(task.keys()):
            if key not in names:
                close = [n for n in names if n.endswith(key.split(".", 1)[-1])][:3]
                raise ValueError(f"{task.name}: adapts {key!r}, which {base.name} does not have"
                                 + (f" (similar base keys: {close})" if close else "")
                                 + "; is the adapter for another model?")
            want = base.shape(key)
            got = task.factors[key].shape() if key in task.factors else tuple(task.full[key].shape)
            if tuple(got) != tuple(want):
                raise ValueError(f"{task.name}: key {key!r} has shape {tuple(got)} but {base.name} has {tuple(want)}")


def _delta(task: LoraAdapter, key: str, weight: Tensor, dtype: torch.dtype) -> Tensor | None:
    if key in task.factors:
        return task.factors[key].dense(dtype).to(weight.device)
    if key in task.full:
        return task.full[key].to(weight.device, dtype) - weight.to(dtype)
    return None


def _averaged(weight: Tensor, tasks: Sequence[LoraAdapter], key: str, alpha: float, dtype: torch.dtype) -> Tensor:
    """base + α · mean of the task vectors (zero for adapters that leave the key alone)."""
    total = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    for task in tasks:
        delta = _delta(task, key, weight, dtype)
        if delta is not None:
            total += delta
    return (weight.to(dtype) + (alpha / len(tasks)) * total).to(weight.dtype)


def _tsv_layer(backend, weight: Tensor, tasks: Sequence[LoraAdapter], key: str, k: int, alpha: float,
               dtype: torch.dtype) -> tuple[Tensor, LayerReport]:
    """TSV-M of one matrix from each task's exact top-k triplets (LoRA: from its factors)."""
    parts = []
    for task in tasks:
        if key in task.factors:
            parts.append(task.factors[key].svd(k, weight.device))
        elif key in task.full:  # a dense replacement: the dense route for this one task
            u, s, v = backend.task_factors(task.full[key].to(weight.device)[None, None], weight[None], k)
            keep = s[0, 0] > 0
            parts.append((u[0, 0][:, keep], s[0, 0][keep], v[0, 0][:, keep]))
    if sum(p[1].numel() for p in parts) == 0:  # every task's Δ is zero here
        return weight.clone(), LayerReport(key, tuple(weight.shape), k)
    u = torch.cat([p[0] for p in parts], dim=1)[None]
    sigma = torch.cat([p[1] for p in parts])[None]
    v = torch.cat([p[2] for p in parts], dim=1)[None]
    merged, (layer,) = merge_stacks(backend, weight[None], u, sigma, v, [key], k, alpha, dtype, weight.dtype)
    return merged[0], layer
