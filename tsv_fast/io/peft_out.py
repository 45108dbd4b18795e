"""A merged LoRA adapter out: the factored updates of a run, written as a PEFT LoRA adapter.

The merged update of T adapters has rank at most Σₜ rₜ, so it is itself an adapter. The engine
hands this sink each matrix's update α·M = L Rᵀ factored (``io.checkpoint.LowRank``); its exact SVD
comes from QR of both sides and the SVD of the small core (``io.peft.lowrank_svd``, never m×n),
numerically zero triplets are dropped and ``max_rank`` keeps the R largest, reporting the share of
the update's energy (Σ kept σ² / Σ σ²) kept. Each module is stored balanced, B = U √σ and
A = √σ Vᵀ, with lora_alpha = r so that PEFT's scale is 1 (α folded into B); ranks that differ per
module go into ``rank_pattern`` / ``alpha_pattern``. Weights the run merges densely (keys an input
saves whole: ``modules_to_save``, biases, averaged conv and norm weights) are stored whole, the way
PEFT saves ``modules_to_save`` (biases of LoRA layers under ``<module>.base_layer``).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import LowRank, Sink
from .peft import CONFIG_NAME, LoraAdapter, lowrank_svd

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class MergedAdapter:
    """A PEFT LoRA adapter in memory: ``tensors`` under PEFT's saved names, ``config`` (the
    adapter_config.json), ``metadata`` (of the safetensors file), per module its ``ranks`` and the
    share of its update's energy kept (``energy``, 1.0 unless ``max_rank`` cut it)."""

    tensors: dict[str, Tensor]
    config: dict
    metadata: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)

    def save(self, folder: str | os.PathLike, *, inputs: Iterable[object] = ()) -> Path:
        """Write adapter_config.json + adapter_model.safetensors into ``folder``, committed whole
        (io.outputs.Output: never over an input, never half-written)."""
        from safetensors.torch import save_file

        from .outputs import Output
        from .safetensors import check_space

        with Output(folder, inputs=inputs, folder=True, what="adapter") as out:
            check_space(out.staging, sum(t.numel() * t.element_size() for t in self.tensors.values()) + (1 << 20),
                        what=str(folder))
            out.member(CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
            save_file({k: t.contiguous() for k, t in self.tensors.items()}, str(out.member(WEIGHTS_NAME)),
                      metadata={"format": "pt", **self.metadata})
            return out.commit()


class AdapterSink(Sink):
    """Gathers a low-rank run's outputs into a ``MergedAdapter`` (returned by ``close``).

    Args:
        adapters: the input adapters (their layouts: which modules are embeddings or fan_in_fan_out,
            their modules_to_save, bias mode, base model name, task type).
        max_rank: keep at most this many triplets per module (None: all of the numerical rank).
        dtype: of the stored tensors (default: the inputs' LoRA dtype).
    """

    def __init__(self, adapters: Sequence[LoraAdapter], *, max_rank: int | None = None,
                 dtype: torch.dtype | None = None):
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
        # each module keeps its inputs' orientation; PEFT sets fan_in_fan_out per layer type anyway
        # (True for Conv1D, False for nn.Linear, with a warning where the config says otherwise)
        self.layouts = {key: factor for a in adapters for key, factor in a.factors.items()}
        self.fan_in_fan_out = any(f.transposed and not f.embedding for f in self.layouts.values())
        factors = list(self.layouts.values())
        self.dtype = dtype or (factors[0].b.dtype if factors else torch.float32)
        self.max_rank, self.adapters = max_rank, list(adapters)
        self.lora: dict[str, tuple[Tensor, Tensor, int]] = {}  # module -> (A, B, rank)
        self.whole: dict[str, Tensor] = {}                      # base key -> merged weight
        self.energy: dict[str, tuple[float, float]] = {}        # module -> (kept, total) Σσ²

    def write(self, key: str, value) -> None:
        from .sink import checked_output

        if not isinstance(value, LowRank):
            self.whole[key] = checked_output(key, value, self.dtype)
            return
        module, dot, name = key.rpartition(".")
        if name != "weight" or not dot or key not in self.layouts:
            raise ValueError(f"key {key!r}: a factored update for a weight no input adapter factors")
        u, sigma, v = lowrank_svd(value.left, value.right, value.left.shape[-1])
        total = float((sigma ** 2).sum())
        keep = sigma.numel() if self.max_rank is None else min(self.max_rank, sigma.numel())
        u, sigma, v = u[:, :keep], sigma[:keep], v[:, :keep]
        self.energy[module] = (float((sigma ** 2).sum()), total)
        if keep == 0:  # the merged update vanishes here: nothing to adapt
            return
        root = sigma.sqrt()
        left, right = u * root, v * root  # Δ = left rightᵀ in the base weight's layout
        if self.layouts[key].transposed:  # PEFT adds (B A)ᵀ for embeddings and fan_in_fan_out layers
            left, right = right, left
        b = checked_output(key + " (lora_B)", left, self.dtype)
        a = checked_output(key + " (lora_A)", right.mT, self.dtype)
        self.lora[module] = (a, b, keep)

    def close(self, metadata: Mapping[str, str]) -> MergedAdapter:
        if not self.lora:
            raise ValueError("no LoRA module has a non-zero merged update, so there is no adapter to write")
        tensors: dict[str, Tensor] = {}
        for module, (a, b, _) in self.lora.items():
            kind = "lora_embedding_" if self.layouts[module + ".weight"].embedding else "lora_"
            suffix = "" if kind == "lora_embedding_" else ".weight"
            tensors[f"{PREFIX}{module}.{kind}A{suffix}"] = a
            tensors[f"{PREFIX}{module}.{kind}B{suffix}"] = b
        saved_whole = set()
        for key, tensor in self.whole.items():
            module, _, name = key.rpartition(".")
            if module in self.lora:  # a LoRA layer's own parameters live under its base_layer
                tensors[f"{PREFIX}{module}.base_layer.{name}"] = tensor
            else:
                tensors[PREFIX + key] = tensor
                saved_whole.add(module)
        ranks = {module: rank for module, (_, _, rank) in self.lora.items()}
        kept, total = (sum(e[i] for e in self.energy.values()) for i in (0, 1))
        meta = {**{str(k): str(v) for k, v in metadata.items()}, "output": "lora_adapter",
                "max_rank": str(self.max_rank), "energy_kept": repr(kept / total if total > 0 else 1.0)}
        return MergedAdapter(tensors, self._config(ranks, sorted(saved_whole)), meta, ranks,
                             {m: (k / t if t > 0 else 1.0) for m, (k, t) in self.energy.items()})

    def _config(self, ranks: dict[str, int], whole: list[str]) -> dict:
        counts = Counter(ranks.values())
        r = max(counts, key=lambda rank: (counts[rank], rank)) if counts else 1
        # lora_alpha = r gives PEFT's scale 1 (α and σ are in the factors); modules of another rank
        # get their own alpha too. Patterns are regexes matched at the end of a module's name.
        other = {re.escape(module): rank for module, rank in sorted(ranks.items()) if rank != r}
        configs = [a.config for a in self.adapters]
        bias = next((mode for mode in ("all", "lora_only") if any(c.get("bias") == mode for c in configs)), "none")
        return {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": dict(other),
                "target_modules": sorted(ranks), "modules_to_save": whole or None,
                "fan_in_fan_out": self.fan_in_fan_out, "bias": bias, "use_rslora": False, "use_dora": False,
                "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
                "base_model_name_or_path": _agreed(configs, "base_model_name_or_path"),
                "task_type": _agreed(configs, "task_type")}


def _agreed(configs: Sequence[Mapping], name: str):
    """The inputs' value of ``name`` where they all give the same one, else None."""
    values = {json.dumps(c.get(name)) for c in configs}
    return configs[0].get(name) if len(values) == 1 and configs else None


def energy_summary(adapter: MergedAdapter) -> str:
    """'kept 99.2% of the update's energy (lowest 97.1%: model.layers.3.mlp.up_proj)'."""
    if not adapter.energy:
        return "no factored module"
    module = min(adapter.energy, key=adapter.energy.get)
    return (f"kept {100 * float(adapter.metadata['energy_kept']):.2f}% of the update's energy "
            f"(lowest {100 * adapter.energy[module]:.2f}%: {module})")
