"""The methods, one small module each: what a method computes from one group's factors and sums.

=============  ==================  =============================================================
name           module              what it writes
=============  ==================  =============================================================
``tsv-m``      ``tsv_m``           TSV-M merged weights (Gargiulo et al., CVPR 2025, Algorithm 1)
``iso-c``      ``iso_c``           Iso-C merged weights (Marczak et al., ICML 2025)
``iso-cts``    ``iso_cts``         Iso-CTS merged weights (Marczak et al., ICML 2025)
``ta``         ``task_arithmetic``  Task Arithmetic merged weights (Ilharco et al., ICLR 2023)
``tsv-c``      ``tsv_c``           TSV-C factors per task (paper Eqs. 5/8)
``sti``        ``sti``             Singular Task Interference per matrix (paper Eq. 7)
=============  ==================  =============================================================

Each has a float64 twin in ``tsv_fast.reference``. ``get_method(name, **parameters)`` makes one.
The names and aliases load without torch (the command line checks a method name before it imports
anything heavy); ``Method`` and the method modules load when first asked for.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method

#: name -> "module:class"; modules load when the method is asked for.
REGISTRY = {
    "tsv-m": "tsv_m:TsvM",
    "iso-c": "iso_c:IsoC",
    "iso-cts": "iso_cts:IsoCTS",
    "ta": "task_arithmetic:TaskArithmetic",
    "tsv-c": "tsv_c:TsvC",
    "sti": "sti:Sti",
}
#: Other spellings users write (mergekit-style names, underscores).
ALIASES = {"tsv": "tsv-m", "tsv_m": "tsv-m", "iso_c": "iso-c", "iso_cts": "iso-cts", "task_arithmetic": "ta",
           "task-arithmetic": "ta", "tsv_c": "tsv-c"}
#: The methods that write merged weights (the choices of `tsv-fast merge --method`).
MERGE_METHODS = ("tsv-m", "iso-c", "iso-cts", "ta")


def __getattr__(name: str):
    if name == "Method":
        return importlib.import_module(f"{__name__}.base").Method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_class(name: str) -> type[Method]:
    canonical = ALIASES.get(name, name)
    if canonical not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[canonical].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def method_parameters(name: str) -> list[str]:
    """The method's own parameters (beyond the shared Options), e.g. iso-cts: common_space_fraction."""
    cls = method_class(name)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def get_method(method: str | Method, **parameters) -> Method:
    """A Method instance from a name (and its parameters), or ``method`` itself."""
    from .base import Method

    if isinstance(method, Method):
        if parameters:
            raise TypeError(f"parameters {sorted(parameters)} given with a Method instance; set them on it")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a Method, got {method!r}")
    cls = method_class(method)
    known = method_parameters(method)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise TypeError(f"method {cls.name!r} has no parameter(s) {unknown}"
                        + (f"; its parameters: {known}" if known else "; it takes none"))
    return cls(**parameters)
