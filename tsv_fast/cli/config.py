"""Merge jobs: a typed YAML config (in the spirit of mergekit) and command-line flags, checked alike.

Every key is known and typed: booleans only from real YAML booleans (``exact: 'no'`` is an error, not
True), numbers finite, dtypes floating point, sizes like ``5GB``; an unknown key or a wrong type fails
with the key, the value and what is allowed. Keys may also sit under ``parameters:`` (mergekit's place
for method parameters); per-model entries are paths or ``{model: PATH, parameters: {weight: W}}``,
where ``weight`` scales that model's task vector before factorisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..io.hf import is_hub_id
from ..methods import ALIASES as METHOD_ALIASES
from ..methods import MERGE_METHODS as METHOD_CHOICES
from .common import CliError, parse_size

BACKENDS = ("auto", "torch", "triton", "cusolver")
MISSING_KEYS = ("base", "zero", "error")  # options.MISSING_KEYS, here without importing torch
#: dtype spellings (as options.parse_dtype reads them) -> name; checked here before torch loads
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
               "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64"}
#: key -> kind; the kinds are checked by typed_value
KEYS = {
    "base_model": "path", "models": "models", "output": "path", "merge_method": "method",
    "alpha": "float", "rank_fraction": "fraction", "min_rank": "int", "rank_overrides": "overrides",
    "common_space_fraction": "unit", "exclude": "strings", "dtype": "compute_dtype", "out_dtype": "out_dtype",
    "device": "str", "backend": "backend", "max_shard_size": "size", "max_chunk_size": "size",
    "allow_pickle": "bool", "exact": "bool", "missing_keys": "missing_keys", "copy_configs": "bool",
    "as_adapter": "bool", "max_rank": "int", "tasks": "ints",
}
ALIASES = {"method": "merge_method"}
#: what may sit under `parameters:` (method parameters, mergekit-style)
PARAMETER_KEYS = ("alpha", "rank_fraction", "min_rank", "rank_overrides", "common_space_fraction", "exclude")
MODEL_PARAMETERS = ("weight",)


@dataclass
class MergeJob:
    """Everything `tsv-fast merge` needs, typed. ``None`` means: not given (defaults apply)."""

    base_model: str | None = None
    models: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    output: str | None = None
    values: dict = field(default_factory=dict)  # the other KEYS, typed

    def get(self, key: str, default=None):
        value = self.values.get(key)
        return default if value is None else value


def load_config(path: Path) -> MergeJob:
    """Read and check a merge config; relative paths are relative to the config file."""
    import yaml

    if not path.is_file():
        raise CliError(f"config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(f"{path}: not valid YAML{where}: {problem}") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise CliError(f"{path}: expected a mapping of options at the top level, got {type(config).__name__}")
    config = dict(config)
    parameters = config.pop("parameters", None) or {}
    if not isinstance(parameters, dict):
        raise CliError(f"{path}: 'parameters' must be a mapping, got {parameters!r}")
    for key in parameters:
        if key not in PARAMETER_KEYS:
            raise CliError(f"{path}: unknown key 'parameters.{key}'; allowed there: {', '.join(PARAMETER_KEYS)}")
        if key in config:
            raise CliError(f"{path}: '{key}' is given both at the top level and under 'parameters'")
    config.update(parameters)
    job = MergeJob()
    for raw_key, value in config.items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in KEYS:
            raise CliError(f"{path}: unknown key {raw_key!r}; allowed: {', '.join(sorted(KEYS))}, parameters")
        typed = typed_value(f"{path}: {raw_key}", KEYS[key], value)
        if key == "models":
            job.models, job.weights = typed
        elif key in ("base_model", "output"):
            job.__setattr__(key, typed)
        else:
            job.values[key] = typed
    # relative paths in a config are relative to the config file; a model id stays an id unless a
    # path of that name exists there
    def resolve(p: str | None, model: bool = True) -> str | None:
        if p is None or Path(p).is_absolute():
            return p
        local = path.parent / p
        return p if model and not local.exists() and is_hub_id(p) else str(local)

    job.models = [resolve(m) for m in job.models]
    job.base_model, job.output = resolve(job.base_model), resolve(job.output, model=False)
    return job


def typed_value(where: str, kind: str, value):
    """``value`` checked (and converted) as ``kind``; CliError naming the key, value and choices."""
    def bad(expected: str):
        return CliError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false (a YAML boolean, unquoted)")
        return value
    if kind in ("float", "fraction", "unit"):
        number = _number(value)
        if number is None:
            raise bad("a number")
        if kind == "fraction" and not 0 < number <= 1:
            raise bad("a number in (0, 1]")
        if kind == "unit" and not 0 <= number <= 1:
            raise bad("a number in [0, 1]")
        return number
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("a whole number >= 0")
        return value
    if kind == "ints":
        if not isinstance(value, list) or not value or not all(type(v) is int and v >= 0 for v in value):
            raise bad("a list of whole numbers >= 0, e.g. [0, 2, 5]")
        return value
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise bad("a string" if kind == "str" else "a path")
        return value
    if kind == "strings":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise bad("a string or a list of strings")
        return items
    if kind in ("method", "backend", "missing_keys"):
        choices = {"method": METHOD_CHOICES, "backend": BACKENDS, "missing_keys": MISSING_KEYS}[kind]
        name = METHOD_ALIASES.get(value, value) if kind == "method" and isinstance(value, str) else value
        if name not in choices:
            raise bad(f"one of {', '.join(choices)}")
        return name
    if kind in ("compute_dtype", "out_dtype"):  # the dtype's name; torch reads it later
        name = DTYPE_NAMES.get(value.lower().removeprefix("torch."), None) if isinstance(value, str) else None
        allowed = ("float32", "float64") if kind == "compute_dtype" else ("float32", "float16", "bfloat16", "float64")
        if name not in allowed:
            raise bad(f"one of {', '.join(allowed)}")
        return name
    if kind == "size":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad("a size such as 5GB, 500MB or a number of bytes")
        try:
            return parse_size(value)
        except CliError:
            raise bad("a size such as 5GB, 500MB or a number of bytes") from None
    if kind == "overrides":
        if not isinstance(value, dict):
            raise bad("a mapping {glob pattern: rank (int) or fraction (float)}")
        for pattern, rank in value.items():
            typed_value(f"{where}.{pattern}", "int" if isinstance(rank, int) and not isinstance(rank, bool) else "fraction", rank)
        return dict(value)
    if kind == "models":
        return _models(where, value)
    raise AssertionError(kind)


def _models(where: str, value) -> tuple[list[str], list[float] | None]:
    if not isinstance(value, list):
        raise CliError(f"{where}: expected a list of model paths or {{model: PATH}} entries, got {value!r}")
    models, weights = [], []
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            models.append(entry)
            weights.append(1.0)
            continue
        if not isinstance(entry, dict) or "model" not in entry:
            raise CliError(f"{where}[{i}]: expected a path or a mapping with a 'model' key, got {entry!r}")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise CliError(f"{where}[{i}]: unknown key(s) {unknown}; a model entry has 'model' and 'parameters'")
        models.append(typed_value(f"{where}[{i}].model", "path", entry["model"]))
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise CliError(f"{where}[{i}].parameters: expected a mapping, got {params!r}")
        unknown = sorted(set(params) - set(MODEL_PARAMETERS))
        if unknown:
            raise CliError(f"{where}[{i}].parameters: unknown key(s) {unknown}; a model takes only "
                           f"{', '.join(MODEL_PARAMETERS)} (scales its task vector before factorisation)")
        weights.append(typed_value(f"{where}[{i}].parameters.weight", "float", params.get("weight", 1.0)))
    return models, (None if all(w == 1.0 for w in weights) else weights)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
