"""TSV-M, Iso-C and Iso-CTS as mergekit merge methods (mergekit >= 0.1.5; imported, never copied).

Importing this module adds to mergekit's method registry (``mergekit.merge_methods.register``):

==============  ==================================  ==============================================
name            what it writes                      parameters (mergekit ``parameters:``)
==============  ==================================  ==============================================
``tsv``         TSV-M merged weights                alpha, rank_fraction, min_rank, exclude; weight
``iso_c``       Iso-C merged weights                alpha, exclude; weight
``iso_cts``     Iso-CTS merged weights              alpha, common_space_fraction, exclude; weight
``tsv_c_task``  one fine-tune rebuilt from the      task (required), rank_fraction, min_rank,
                top-k triplets TSV-C keeps of it    exclude
==============  ==================================  ==============================================

mergekit hands a method one tensor at a time, all models' copies of it; that is the granularity of
these methods, so each tensor is one call of tsv_fast's engine on a one-key input
(``tsv_fast.merge({name: base}, [{name: ft} ...])``) on the device mergekit computes on (``--cuda``,
``--device``): float64 Grams and eigensolvers, no full SVD, the accuracy contract of the README. As the
engine treats every key on its own (rank rule, exclusion, mean of the non-matrix tensors, k = 0
layers, all-zero deltas), the result equals ``tsv-fast merge`` of the whole checkpoints key by key.

The base model is required (task vectors are differences to it); T is the number of other models.
Parameters (each may vary per tensor with mergekit's ``filter:`` conditions, or over layers as a
gradient, like any mergekit parameter):

* ``alpha`` (1.0): W = W_pre + alpha·M.
* ``rank_fraction`` (1/T): each task keeps k = int(min(m, n) · rank_fraction) triplets per matrix.
* ``min_rank`` (0): at least this many triplets (1 keeps matrices with min(m, n) < T).
* ``exclude`` ("text_projection", tsv_fast's default): comma-separated substrings; 2-D tensors whose
  name contains one are averaged like the 1-D ones. One string, not a YAML list: mergekit reads a
  list as a gradient over layers (``tsv-fast mergekit`` refuses a list).
* ``common_space_fraction`` (0.8, iso_cts): share of the common subspace.
* ``weight`` (per model, 1.0): scales that model's task vector before factorisation, as
  ``parameters: {weight: W}`` does in ``tsv-fast merge`` configs. It is not normalised.
* ``task`` (tsv_c_task): which non-base model to rebuild, 0-based in the config's order.

Tensors whose shapes differ between models (embeddings and heads of different vocabularies) are
refused with mergekit's own message ("Tensor size mismatch for ..."); mergekit's ``tokenizer:``
option aligns vocabularies first. Non-floating tensors are copied by mergekit before a method runs.
"""
from __future__ import annotations

# The method functions' annotations are read by mergekit with typing.get_type_hints, which under
# ``from __future__ import annotations`` resolves them in this module's globals: every name used in
# an annotation below must be imported at module level.
from typing import Optional

import torch

import tsv_fast

try:
    from mergekit.merge_methods import (BasePolicy, InputContract, ParameterScope, PerNonBase, TensorGroup,
                                        get, merge_method, register)
    from pydantic import BeforeValidator, Field, ValidationError
    from typing_extensions import Annotated
except ImportError as exc:  # mergekit is an optional extra
    raise ImportError('tsv_fast.integrations.mergekit needs mergekit >= 0.1.5: pip install "tsv_fast[mergekit]" '
                      f"({exc})", name=exc.name) from exc

DEFAULT_EXCLUDE = "text_projection"


def _no_bool(value):
    # pydantic's lax mode would read `alpha: true` as 1.0; tsv_fast never takes a boolean for a number
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
Fraction = Annotated[float, BeforeValidator(_no_bool), Field(gt=0, le=1)]
UnitFraction = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, le=1)]
Count = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]

# A task vector needs the base; one fine-tune is enough (T = 1 gives it back, as tsv-fast merge does).
_CONTRACT = InputContract(base=BasePolicy.REQUIRED, min_non_base=1)


def patterns(exclude: str) -> tuple[str, ...]:
    """'text_projection, lm_head' -> ('text_projection', 'lm_head'); '' excludes nothing."""
    return tuple(p.strip() for p in exclude.split(",") if p.strip())


def _inputs(group: TensorGroup, method: str):
    """(name, base tensor, non-base entries) of one tensor group, checked the way mergekit checks."""
    name = group.metadata.name or "tensor"
    group.validate_tensors()  # mergekit's shape/device check and message, also for direct callers
    if group.base is None or not group.non_base:
        raise ValueError(f"{name}: merge method {method} needs the base model and at least one other model")
    return name, group.base.tensor, group.non_base


def _merge(group: TensorGroup, method: str, weight, **options) -> torch.Tensor:
    name, base, tasks = _inputs(group, method)
    weights = [float(w) for w in weight.values_for(tasks)]
    merged = tsv_fast.merge({name: base}, [{name: entry.tensor} for entry in tasks], method=method,
                            weights=None if all(w == 1.0 for w in weights) else weights,
                            exclude=patterns(options.pop("exclude")), device=str(base.device), **options)
    return merged[name]


@merge_method(name="tsv", pretty_name="TSV-M (tsv_fast)", reference_url="https://arxiv.org/abs/2412.00081",
              contract=_CONTRACT)
def tsv_merge(group: TensorGroup, weight: PerNonBase[Number] = 1.0, alpha: Number = 1.0,
              rank_fraction: Optional[Fraction] = None, min_rank: Count = 0,
              exclude: str = DEFAULT_EXCLUDE) -> torch.Tensor:
    return _merge(group, "tsv-m", weight, alpha=alpha, rank_fraction=rank_fraction, min_rank=min_rank,
                  exclude=exclude)


@merge_method(name="iso_c", pretty_name="Iso-C (tsv_fast)", reference_url="https://arxiv.org/abs/2502.04959",
              contract=_CONTRACT)
def iso_c_merge(group: TensorGroup, weight: PerNonBase[Number] = 1.0, alpha: Number = 1.0,
                exclude: str = DEFAULT_EXCLUDE) -> torch.Tensor:
    return _merge(group, "iso-c", weight, alpha=alpha, exclude=exclude)


@merge_method(name="iso_cts", pretty_name="Iso-CTS (tsv_fast)", reference_url="https://arxiv.org/abs/2502.04959",
              contract=_CONTRACT)
def iso_cts_merge(group: TensorGroup, weight: PerNonBase[Number] = 1.0, alpha: Number = 1.0,
                  common_space_fraction: UnitFraction = 0.8, exclude: str = DEFAULT_EXCLUDE) -> torch.Tensor:
    return _merge(group, "iso-cts", weight, alpha=alpha, common_space_fraction=common_space_fraction,
                  exclude=exclude)


@merge_method(name="tsv_c_task", pretty_name="TSV-C task rebuild (tsv_fast)",
              reference_url="https://arxiv.org/abs/2412.00081", contract=_CONTRACT)
def tsv_c_task(group: TensorGroup, task: Count, rank_fraction: Optional[Fraction] = None, min_rank: Count = 0,
               exclude: str = DEFAULT_EXCLUDE) -> torch.Tensor:
    """W_pre + U_t diag(σ_t) V_tᵀ: what TSV-C stores of fine-tune ``task`` (its raw delta for non-matrices)."""
    name, base, tasks = _inputs(group, "tsv_c_task")
    if task >= len(tasks):
        raise ValueError(f"{name}: task {task} out of range: {len(tasks)} fine-tuned model(s), tasks 0 to "
                         f"{len(tasks) - 1} in the config's order")
    packed = tsv_fast.compress({name: base}, [{name: entry.tensor} for entry in tasks], rank_fraction=rank_fraction,
                               min_rank=min_rank, exclude=patterns(exclude), device=str(base.device))
    return packed.reconstruct(task, {name: base})[name]


METHODS = (tsv_merge, iso_c_merge, iso_cts_merge, tsv_c_task)
METHOD_NAMES = tuple(method.spec.name for method in METHODS)


def register_methods() -> tuple[str, ...]:
    """Add the methods to mergekit's registry. Idempotent (a re-import keeps the first registration);
    a name that another package registered first is an error (mergekit's ``register`` would raise)."""
    for method in METHODS:
        try:
            existing = get(method.spec.name)
        except RuntimeError:  # mergekit's "Unimplemented merge method"
            existing = None
        if existing is None:
            register(method)
        elif getattr(getattr(existing, "implementation", None), "__module__", None) != __name__:
            raise RuntimeError(f"mergekit already has a merge method named {method.spec.name!r} "
                               f"({existing.spec.pretty_name}); tsv_fast cannot register its own under that name")
    return METHOD_NAMES


register_methods()


# ------------------------------------------------------------------------------------------------
# Config checks mergekit does not make (it ignores unknown parameter names and per-model values of
# shared parameters); `tsv-fast mergekit` runs them before the merge starts.
# ------------------------------------------------------------------------------------------------
def check_config(config: dict) -> None:
    """Refuse, in one line naming the place, what mergekit would silently ignore or misread in the
    ``parameters:`` blocks of a config using one of these methods: unknown names, shared parameters
    set per model, a YAML list for ``exclude``, and values of the wrong type or range."""
    name = config.get("merge_method") if isinstance(config, dict) else None
    method = {m.spec.name: m for m in METHODS}.get(name)
    if method is None:
        return
    spec = {p.name: p for p in method.spec.parameters}
    for where, settings, per_model in _parameter_blocks(config):
        if not isinstance(settings, dict):
            continue
        for key, setting in settings.items():
            parameter = spec.get(key)
            if parameter is None:
                raise ValueError(f"{where}: unknown parameter {key!r} for merge method {name}; "
                                 f"its parameters: {', '.join(spec)}")
            if per_model and parameter.scope == ParameterScope.SHARED:
                raise ValueError(f"{where}.{key}: {key} applies to the whole merge, not to one model; set it under "
                                 "the top-level parameters (mergekit would ignore it here)")
            if key == "exclude" and isinstance(setting, list) and setting and all(isinstance(v, str) for v in setting):
                raise ValueError(f"{where}.exclude: write the patterns as one comma-separated string, e.g. "
                                 f"{','.join(setting)!r} (mergekit reads a YAML list as a gradient over layers)")
            for value in _values(setting):
                try:
                    parameter.validate(value)
                except ValidationError as exc:
                    raise ValueError(f"{where}.{key}: {exc.errors()[0]['msg']}, got {value!r}") from None
    if "task" in spec and not any(isinstance(s, dict) and "task" in s for _, s, _ in _parameter_blocks(config)):
        raise ValueError(f"merge method {name} needs the parameter task (which fine-tuned model to rebuild, "
                         "0-based in the config's order)")


def _parameter_blocks(config: dict):
    """(where, settings, per_model) for every ``parameters:`` block of a mergekit config."""
    def models(prefix, entries):
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, dict):
                yield f"{prefix}[{i}].parameters", entry.get("parameters"), True

    def slices(prefix, entries):
        for j, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, dict):
                yield f"{prefix}[{j}].parameters", entry.get("parameters"), False
                yield from models(f"{prefix}[{j}].sources", entry.get("sources"))

    yield "parameters", config.get("parameters"), False
    yield from models("models", config.get("models"))
    yield from slices("slices", config.get("slices"))
    modules = config.get("modules")
    for module, body in (modules.items() if isinstance(modules, dict) else ()):
        if isinstance(body, dict):
            yield f"modules.{module}.parameters", body.get("parameters"), False
            yield from models(f"modules.{module}.models", body.get("models"))
            yield from slices(f"modules.{module}.slices", body.get("slices"))


def _values(setting):
    """The plain values of one setting: a scalar, a gradient (list) or {filter, value} conditions."""
    if isinstance(setting, dict):
        return _values(setting.get("value"))
    if isinstance(setting, list):
        return [v for item in setting for v in _values(item)]
    return [setting]
