"""The optional libraries of the tests (transformers, peft, huggingface_hub, mergekit), imported by
the test that needs one, never at collection: transformers imports triton, which the kernel tests
must import first (after setting TRITON_INTERPRET=1), and one library that fails to import must not
stop the whole run.

A library that is not installed, or is installed but cannot be imported in this Python, skips the
test with that reason. The second case is real: a CI machine's Python whose ssl extension failed to
load (``undefined symbol``) broke huggingface_hub, and with it transformers, peft and mergekit.
``TSV_FAST_REQUIRE=transformers,peft,...`` (set by .ci/hf_stack.sh, in an environment where they
import) turns those skips into failures.
"""
from __future__ import annotations

import importlib
import os

import pytest

from tsv_fast.io.hf import broken_import


def required() -> set[str]:
    return {name.strip() for name in os.environ.get("TSV_FAST_REQUIRE", "").split(",") if name.strip()}


def need(name: str):
    """The module ``name``, or a skip (a failure where TSV_FAST_REQUIRE names it) saying why not."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        broken = broken_import(exc, name)
        extra = "mergekit" if name.startswith("mergekit") else "test"
        reason = (f"{name} is installed but cannot be imported in this Python: {broken}" if broken
                  else f"{name} is not installed (pip install -e '.[{extra}]')")
        if name in required():
            pytest.fail(f"{reason}; TSV_FAST_REQUIRE names it", pytrace=False)
        pytest.skip(reason, allow_module_level=True)  # a module that needs it at import skips whole
