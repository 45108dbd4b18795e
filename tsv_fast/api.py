"""The public functions: thin wrappers that build a task source, a method and a sink, and run them.

Every function takes the shared options (``tsv_fast.Options``: alpha, rank_fraction, exclude,
compute_dtype, backend, device, max_chunk_bytes, exact, ...) either as ``options=Options(...)`` or as
keywords, and a method's own parameters as keywords too (e.g. ``common_space_fraction`` for iso-cts).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .engine.run import run
from .engine.sources import DenseTasks
from .io.checkpoint import Sink, as_checkpoint
from .methods import Method, get_method, method_parameters
from .options import Options


def _split(method: str | Method, options: Options | None, keywords: dict) -> tuple[Method, Options]:
    """Keywords that name a method parameter go to the method, the rest to Options (unknown: error)."""
    own = method_parameters(method) if isinstance(method, str) else []
    params = {name: keywords.pop(name) for name in list(keywords) if name in own}
    shared = [f.name for f in dataclasses.fields(Options)]
    unknown = sorted(set(keywords) - set(shared))
    if unknown:
        name = method if isinstance(method, str) else method.name
        raise TypeError(f"unknown option(s) {unknown} for method {name!r}; its own parameters: {own or 'none'}; "
                        f"shared options: {shared}")
    return get_method(method, **params), Options.of(options, **keywords)


def _tasks(pretrained, finetuned: Sequence, weights: Sequence[float] | None = None):
    """The task source: PEFT LoRA adapters (folders or io.peft.LoraAdapter objects) of a base, or full
    checkpoints / task vectors."""
    from .io.peft import LoraAdapter, is_adapter

    lora = [isinstance(ft, LoraAdapter) or isinstance(ft, (str, os.PathLike)) and is_adapter(ft) for ft in finetuned]
    if not any(lora):
        base = as_checkpoint(pretrained, "the pretrained checkpoint") if pretrained is not None else None
        return DenseTasks(base, [as_checkpoint(ft, f"fine-tuned checkpoint {i}") for i, ft in enumerate(finetuned)],
                          weights)
    from .engine.adapters import AdapterTasks
    from .io.peft import load_adapter

    if not all(lora):
        raise ValueError(f"the inputs mix LoRA adapters ({lora.index(True)}) and full checkpoints ({lora.index(False)}); "
                         "pass one kind")
    if pretrained is None or weights is not None:
        raise ValueError("LoRA adapters need their base model" if pretrained is None else
                         "per-task weights are not supported for LoRA adapters")
    return AdapterTasks(as_checkpoint(pretrained, "the pretrained checkpoint"),
                        [a if isinstance(a, LoraAdapter) else load_adapter(a) for a in finetuned])


def merge(pretrained, finetuned: Sequence, *, method: str | Method = "tsv-m", weights: Sequence[float] | None = None,
          sink: Sink | None = None, options: Options | None = None, return_report: bool = False, **keywords):
    """Merged weights W_pre + α·M of T fine-tuned models with any merge method.

    Args:
        pretrained: state dict, nn.Module, checkpoint path (safetensors file, model folder, .pt/.bin) or
            Hugging Face model id ("org/name", "org/name@revision"; a path that exists wins).
        finetuned: T of the same kind, or T PEFT LoRA adapters of ``pretrained`` (see lora_tsv_merge).
        method: "tsv-m" (default), "iso-c", "iso-cts", "ta" (Task Arithmetic), or a Method object.
        weights: per-task scale of each task vector before anything else (default 1).
        sink: where outputs go (default: a dict returned to the caller; e.g. io.SafetensorsSink).
        options / keywords: the shared options (see tsv_fast.Options) and the method's parameters.

    Example:
        >>> merged = tsv_fast.merge(pre_sd, [ft_a, ft_b, ft_c], method="iso-cts", alpha=1.5)
    """
    method, options = _split(method, options, keywords)
    if method.writes != "weights":
        raise ValueError(f"method {method.name!r} does not write weights; use tsv_fast.compress / interference")
    result, report = run(_tasks(pretrained, finetuned, weights), method, options, sink)
    return (result, report) if return_report else result


def tsv_merge(pretrained, finetuned: Sequence, *, sink: Sink | None = None, options: Options | None = None,
              return_report: bool = False, **keywords):
    """TSV-M merged weights W_pre + α·M (α = 1.0 by default, the paper's). Inputs as in ``merge``.

    Keywords: any field of tsv_fast.Options (alpha, rank_fraction, rank_overrides, min_rank, exclude,
    compute_dtype, backend, device, max_chunk_bytes, progress, exact, out_dtype, missing_keys).
    Inputs may be Hugging Face model ids ("org/name@rev"); they are never modified.
    """
    return merge(pretrained, finetuned, method="tsv-m", sink=sink, options=options, return_report=return_report,
                 **keywords)


def fast_tsv_merge(task_vectors: Sequence[Mapping[str, Tensor]], *, options: Options | None = None,
                   return_report: bool = False, **keywords):
    """TSV-M merged task vector M (α not applied), a drop-in for the authors'
    ``compute_and_sum_svd_mem_reduction``.

    Args:
        task_vectors: T dicts key -> Δᵢ (same keys and shapes; fp32, bf16 or fp16).
        options / keywords: tsv_fast.Options fields except alpha: rank_fraction (k = int(min(m, n) ·
            rank_fraction), 1/T by default), exclude (2-D keys containing these are averaged), backend
            ("auto" | "torch" | "triton" | "cusolver"), device, compute_dtype (float32: Grams and
            eigensolvers still in float64; or float64), min_rank, rank_overrides, max_chunk_bytes,
            exact (the authors' full-SVD route), progress.
        return_report: also return a Report (per-layer κ(U), κ(V), numerical ranks, timings).

    Returns:
        dict key -> M (same shapes and dtypes). Inputs are never modified.

    Example:
        >>> merged_tv = fast_tsv_merge([tv_mnist, tv_svhn, tv_cars])
        >>> model.load_state_dict({k: w + merged_tv[k] for k, w in pretrained.items()})
    """
    if "alpha" in keywords:
        raise TypeError("fast_tsv_merge returns M without α (as the authors' function); use tsv_merge for W_pre + α·M")
    return merge(None, task_vectors, method="tsv-m", options=options, return_report=return_report, **keywords)


def task_arithmetic(pretrained, finetuned: Sequence, *, alpha: float = 1.0,
                    compute_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Task Arithmetic baseline: W_pre + α Σᵢ (W_ftᵢ − W_pre), streamed key by key."""
    return merge(pretrained, finetuned, method="ta", alpha=alpha, compute_dtype=compute_dtype)


def compress(pretrained, finetuned: Sequence, *, storage_dtype: torch.dtype = torch.float32,
             options: Options | None = None, **keywords):
    """TSV-C: each task's top-k singular triplets per matrix (k = int(min(m, n)/T) by default).

    ``pretrained=None`` takes ``finetuned`` as task vectors; LoRA adapters (folders or LoraAdapter
    objects) are compressed from their factors; ``exact=True`` takes the factors from full SVDs in
    ``compute_dtype`` (the authors' route). Returns an io.tsvc.CompressedTasks; its metadata records
    the rank rule and exclude patterns (``append_tasks`` follows them).
    Storage per matrix: k(m + n + 1) numbers per task instead of mn, so T tasks take about
    (m + n)/max(m, n) / T of the dense task vectors: 2/T for square matrices.

    Example:
        >>> packed = compress(pretrained_sd, [ft_a, ft_b, ft_c])
        >>> weights_b = packed.reconstruct(1, pretrained_sd)
    """
    from .methods.tsv_c import CompressedSink

    source = _tasks(pretrained, finetuned)
    options = Options.of(options, **keywords)
    result, _ = run(source, get_method("tsv-c", storage_dtype=storage_dtype), options,
                    CompressedSink(source.reference, source.num_tasks))
    result.metadata.update({"exclude": json.dumps(list(options.exclude)), "min_rank": str(options.min_rank),
                            **({"rank_overrides": json.dumps(options.rank_overrides)} if options.rank_overrides else {})})
    return result


def interference(pretrained, finetuned: Sequence, *, orthogonalized: bool = False, options: Options | None = None,
                 **keywords) -> dict[str, float]:
    """STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁ for every factored matrix key (paper Eq. 7), in checkpoint order.

    ``pretrained=None`` takes ``finetuned`` as task vectors; LoRA adapters are read from their factors
    (the stacks are Σ rₜ wide, nothing m×n is formed). With ``orthogonalized=True`` the stacks
    are first replaced by their polar factors U⊥, V⊥ (the interference left after TSV-M). Layers with
    k = 0 or all-zero task vectors are left out. Computed in float64 unless compute_dtype is given.

    Example:
        >>> sti = interference(pretrained_sd, finetuned_sds)
        >>> per_block(sti)   # {'visual.transformer.resblocks.0': 12.3, ...}
    """
    keywords.setdefault("compute_dtype", torch.float64)
    source = _tasks(pretrained, finetuned)
    scores, _ = run(source, get_method("sti", orthogonalized=orthogonalized), Options.of(options, **keywords))
    order = {key: i for i, key in enumerate(source.reference.keys())}
    return dict(sorted(scores.items(), key=lambda item: order[item[0]]))


def lora_tsv_merge(pretrained, adapters: Sequence, *, method: str | Method = "tsv-m", output: str = "weights",
                   max_rank: int | None = None, sink: Sink | None = None, options: Options | None = None,
                   return_report: bool = False, **keywords):
    """Merge T PEFT LoRA adapters of one base: merged weights W_pre + α·M, or a merged adapter.

    ``adapters``: adapter folders / files (PEFT format) or io.peft.LoraAdapter objects. The top-k
    triplets of each update come from its low-rank factors, so no m×n task vector of a LoRA weight
    is ever formed; the result equals ``merge`` on the dense fine-tunes. Options as in ``merge``.

    ``output="adapter"`` returns an ``io.peft_out.MergedAdapter`` instead (``.save(folder)`` writes
    a PEFT adapter): the merged update α·M of every LoRA module, of rank at most Σ rₜ, as lora_A /
    lora_B (its SVD from the small core, never densified), ``max_rank`` keeping each module's top R
    triplets (``.energy``: the share of Σσ² kept per module); keys the inputs save whole as
    ``modules_to_save``. Every merge method works; for Task Arithmetic M = Σₜ Δₜ.

    Example:
        >>> merged = lora_tsv_merge("llama-7b/", ["lora-math/", "lora-code/", "lora-chat/"])
        >>> lora_tsv_merge("llama-7b/", ["lora-math/", "lora-code/"], output="adapter").save("merged-lora/")
    """
    from .engine.adapters import AdapterTasks
    from .io.peft import LoraAdapter, load_adapter

    if output not in ("weights", "adapter"):
        raise ValueError(f"output must be 'weights' or 'adapter', got {output!r}")
    if max_rank is not None and output != "adapter":
        raise ValueError("max_rank truncates a merged adapter: pass output='adapter'")
    method, options = _split(method, options, keywords)
    base = as_checkpoint(pretrained, "the pretrained checkpoint")
    tasks = [a if isinstance(a, LoraAdapter) else load_adapter(a) for a in adapters]
    if output == "adapter" and sink is None:
        from .io.peft_out import AdapterSink

        sink = AdapterSink(tasks, max_rank=max_rank, dtype=options.out_dtype)
    # STI comes with the report: the stacks are only Σ rₜ wide, so it costs next to nothing here
    result, report = run(AdapterTasks(base, tasks), method, options, sink, compute_sti=True,
                         low_rank=output == "adapter")
    return (result, report) if return_report else result


def merge_compressed(pretrained, library, *, tasks: Sequence[int] | None = None, method: str | Method = "tsv-m",
                     sink: Sink | None = None, options: Options | None = None, return_report: bool = False,
                     **keywords):
    """Merged weights W_pre + α·M of stored tasks of a TSV-C library, no fine-tune needed.

    ``library``: a TSV-C file (``tsv-fast compress``, ``io.save_compressed``), a CompressedTasks or an
    io.TsvcLibrary (its ``bytes_read`` counts what the merge read);
    ``tasks``: which stored tasks (default: all). Each task gives k = min(stored k, the method's rank
    rule for len(tasks) tasks) triplets per matrix, read one key at a time (the output metadata says
    which k each matrix got); where the stored k suffices the result equals ``merge`` on the full
    fine-tunes, up to the storage dtype's rounding of the factors. Options as in ``merge``.

    Example:
        >>> merged = merge_compressed("vit-b32/pretrained.safetensors", "tasks.tsvc", tasks=[0, 2, 5])
    """
    from .engine.tsvc import LibraryTasks
    from .io.tsvc import TsvcLibrary

    method, options = _split(method, options, keywords)
    if method.writes != "weights":
        raise ValueError(f"method {method.name!r} does not write weights")
    library = library if isinstance(library, TsvcLibrary) else TsvcLibrary(library)
    source = LibraryTasks(as_checkpoint(pretrained, "the pretrained checkpoint"), library, tasks)
    result, report = run(source, method, options, sink, compute_sti=True)
    return (result, report) if return_report else result


def append_tasks(library, pretrained, finetuned: Sequence, *, output=None, names: Sequence[str] | None = None,
                 options: Options | None = None, **keywords) -> dict:
    """Add tasks to a TSV-C file without touching the stored ones (``tsv-fast compress --append``).

    The new tasks (full checkpoints or LoRA adapters of ``pretrained``) are compressed at the
    library's ranks: each matrix's stored k (a key no stored task changed: the library's rank rule),
    its exclude patterns and storage dtype. The file is rewritten whole (to ``output``, default the
    library itself), the stored tasks' tensors copied byte for byte. ``names`` of the new tasks go into
    the file's list of models (default: their file names, when given as paths). Returns the storage
    accounting.

    Example:
        >>> append_tasks("tasks.tsvc", "pre.safetensors", ["ft_new.safetensors"])
    """
    from .io.tsvc import append_compressed, read_compressed_header

    fixed = sorted({"rank_fraction", "rank_overrides", "min_rank", "exclude"} & set(keywords))
    if fixed:
        raise TypeError(f"an appended task follows the library's rank rule and exclude patterns; remove {fixed}")
    header = read_compressed_header(library)
    meta = header.get("metadata", {})
    fraction = meta.get("rank_fraction", f"1/{header['num_tasks']}")
    numerator, _, denominator = fraction.partition("/")
    overrides = {**json.loads(meta.get("rank_overrides", "{}")),
                 **{re.sub(r"([*?\[])", r"[\1]", key): int(info["k"])  # the key, as an fnmatch pattern
                    for key, info in header["keys"].items() if info["kind"] == "factors"}}
    options = Options.of(options, rank_fraction=float(numerator) / float(denominator or 1), rank_overrides=overrides,
                         min_rank=int(meta.get("min_rank", 0)),
                         exclude=tuple(json.loads(meta.get("exclude", '["text_projection"]'))), **keywords)
    packed = compress(pretrained, finetuned, storage_dtype=meta.get("storage_dtype", "float32"), options=options)
    if names is None and all(isinstance(f, (str, os.PathLike)) for f in finetuned):
        names = [Path(f).name for f in finetuned]
    if names is not None:
        packed.metadata["models"] = json.dumps(list(names))
    return append_compressed(library, packed, output=output, inputs=[pretrained, *finetuned])
