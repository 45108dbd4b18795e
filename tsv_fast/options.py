"""The options of every merge, as one typed object shared by the API, the command line and YAML configs.

``Options`` holds what every method and route understands (α, rank rule, compute dtype, backend,
memory budget, ...); a method's own parameters live on the method object (``tsv_fast.methods``).
Values are checked when the object is made, so a bad value fails at once with its name, never deep
inside a merge: booleans must be real booleans (``exact='no'`` is an error, not True), α finite,
dtypes floating point.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

COMPUTE_DTYPES = (torch.float32, torch.float64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: What a key present in some checkpoints only means (Options.missing_keys), see DenseTasks.check.
MISSING_KEYS = ("base", "zero", "error")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "fp16": "float16", "f16": "float16",
                  "half": "float16", "bf16": "bfloat16", "fp64": "float64", "f64": "float64", "double": "float64"}


def parse_dtype(name: str | torch.dtype | None, *, floating: bool = False) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / 'torch.float32' / torch.float16 -> torch dtype (None stays None).

    With ``floating`` only float64/32/16 and bfloat16 are accepted (outputs and computations).
    """
    if name is None:
        return None
    dtype = name if isinstance(name, torch.dtype) else None
    if dtype is None:
        key = str(name).lower().removeprefix("torch.")
        dtype = getattr(torch, _DTYPE_ALIASES.get(key, key), None)
    allowed = FLOAT_DTYPES if floating else None
    if not isinstance(dtype, torch.dtype) or (allowed and dtype not in allowed):
        choices = "float32, float16, bfloat16 or float64" if floating else "a torch dtype name such as float32"
        raise ValueError(f"unknown or unsupported dtype {name!r}; use {choices}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_device(device: str | torch.device) -> str:
    """``device`` as a string, or ValueError in one line when it is malformed or absent (CUDA asked
    for on a machine without it), so a run fails before it reads anything."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device name; use cpu, cuda or cuda:1") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"device {str(device)!r}: CUDA is not available here ({why}); use cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA device(s) are visible")
    return str(device)


@dataclass
class Options:
    """Options of a merge (TSV-M, Iso-C, Iso-CTS, Task Arithmetic), TSV-C and STI.

    Attributes:
        alpha: scale of the merged task vector, W = W_pre + α·M (finite; 1.0 is the paper's default).
        rank_fraction: per-task rank k = int(min(m, n) · rank_fraction); None means 1/T.
        rank_overrides: {glob pattern: int rank or float fraction} per key, first match wins.
        min_rank: lower bound on k (1 keeps layers with min(m, n) < T instead of leaving them unmerged).
        exclude: 2-D keys containing any of these substrings are averaged instead of factored.
        compute_dtype: torch.float32 (Grams and eigensolvers still run in float64) or torch.float64.
        backend: "auto" | "torch" | "triton" | "cusolver"; None reads TSV_FAST_BACKEND, else auto.
        device: where to compute (None: where the inputs are).
        max_chunk_bytes: working memory of one chunk of same-shape layers (inputs + float64 buffers).
        progress: show progress bars.
        exact: the authors' full-SVD route (one SVD per task, Procrustes by SVD) in compute_dtype.
        out_dtype: dtype of floating outputs (None: each key's dtype in the base); the engine rounds
            once, to this dtype, so float64 keeps a float64 computation's digits.
        missing_keys: a key present in some checkpoints only: "base" (default: buffers and keys
            transformers ignores on load come from the base, with a warning; other keys are
            refused), "zero" (also: a key a fine-tune lacks is a zero task vector for it) or
            "error" (every difference is refused).
    """

    alpha: float = 1.0
    rank_fraction: float | None = None
    rank_overrides: Mapping[str, float | int] | None = None
    min_rank: int = 0
    exclude: tuple[str, ...] = ("text_projection",)
    compute_dtype: torch.dtype = torch.float32
    backend: str | None = None
    device: str | None = None
    max_chunk_bytes: int = 256 << 20
    progress: bool = False
    exact: bool = False
    out_dtype: torch.dtype | None = None
    missing_keys: str = "base"

    def __post_init__(self) -> None:
        for name in ("progress", "exact"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"option {name} must be True or False, got {getattr(self, name)!r}")
        self.alpha = _number("alpha", self.alpha)
        if self.rank_fraction is not None:
            self.rank_fraction = _number("rank_fraction", self.rank_fraction)
            if not 0 < self.rank_fraction <= 1:
                raise ValueError(f"option rank_fraction must be in (0, 1], got {self.rank_fraction}")
        self.min_rank = _integer("min_rank", self.min_rank, low=0)
        self.max_chunk_bytes = _integer("max_chunk_bytes", self.max_chunk_bytes, low=1)
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        if not all(isinstance(p, str) for p in self.exclude):
            raise TypeError(f"option exclude must be a list of strings, got {self.exclude!r}")
        self.exclude = tuple(self.exclude)
        self.compute_dtype = parse_dtype(self.compute_dtype)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"option compute_dtype must be float32 or float64, got {dtype_name(self.compute_dtype)}")
        for name in ("backend", "device"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, torch.device)):
                raise TypeError(f"option {name} must be a string, got {value!r}")
        self.device = None if self.device is None else check_device(self.device)
        self.out_dtype = parse_dtype(self.out_dtype, floating=True)
        if self.missing_keys not in MISSING_KEYS:
            raise ValueError(f"option missing_keys must be one of {', '.join(MISSING_KEYS)}, got {self.missing_keys!r}")
        self.rank_overrides = _overrides(self.rank_overrides)

    @classmethod
    def of(cls, options: Options | None = None, **overrides) -> Options:
        """``options`` with ``overrides`` applied; unknown names fail with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return dataclasses.replace(options or cls(), **overrides)

    def rank(self, key: str, shape: Sequence[int], num_tasks: int) -> int:
        """The TSV rank rule for one matrix: an override, else int(min(m, n) · fraction) (≥ min_rank)."""
        for pattern, value in (self.rank_overrides or {}).items():
            if fnmatch.fnmatchcase(key, pattern):
                if isinstance(value, int):
                    return max(0, min(value, min(shape)))
                return rank_per_task(shape, num_tasks, value, self.min_rank)
        return rank_per_task(shape, num_tasks, self.rank_fraction, self.min_rank)


def rank_per_task(shape: Sequence[int], num_tasks: int, rank_fraction: float | None = None,
                  min_rank: int = 0) -> int:
    """k = int(min(m, n) * rank_fraction), rank_fraction = 1/T by default (the authors' formula)."""
    r = min(shape)
    fraction = 1.0 / num_tasks if rank_fraction is None else float(rank_fraction)
    return min(r, max(int(r * fraction), int(min_rank)))


def is_merged_as_matrix(key: str, shape: Sequence[int], exclude: Sequence[str]) -> bool:
    """2-D parameters are factored; everything else (and excluded names) is combined elementwise."""
    return len(shape) == 2 and not any(pattern in key for pattern in exclude)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"option {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"option {name} must be finite, got {value!r}")
    return float(value)


def _integer(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"option {name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"option {name} must be at least {low}, got {value}")
    return value


def _overrides(value) -> dict[str, float | int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"option rank_overrides must map glob patterns to a rank or a fraction, got {value!r}")
    out: dict[str, float | int] = {}
    for pattern, rank in value.items():
        if not isinstance(pattern, str):
            raise TypeError(f"rank_overrides: pattern {pattern!r} is not a string")
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise TypeError(f"rank_overrides[{pattern!r}] must be an int rank or a float fraction, got {rank!r}")
        if isinstance(rank, int) and rank < 0 or isinstance(rank, float) and not 0 < rank <= 1:
            raise ValueError(f"rank_overrides[{pattern!r}] = {rank!r}: a rank must be >= 0, a fraction in (0, 1]")
        out[pattern] = rank
    return out


__all__ = ["Options", "parse_dtype", "dtype_name", "check_device", "MISSING_KEYS", "rank_per_task", "is_merged_as_matrix", "COMPUTE_DTYPES",
           "FLOAT_DTYPES"]
