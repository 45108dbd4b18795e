"""Fuzz the hand-written safetensors reader (io/safetensors.py): any byte string is either a valid
file, read back exactly as the safetensors library writes it, or a ValueError naming the file. Never
another exception, a hang, or an allocation larger than the file. Bounded in time for CI (a few
hundred examples per property, no deadline so a loaded machine does not flake)."""
from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tsv_fast.io.safetensors import SafetensorsCheckpoint

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_or_refuse(data: bytes) -> dict[str, torch.Tensor] | None:
    """Every tensor of ``data`` as a file, or None when the reader refused it the right way."""
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "fuzz.safetensors"
        file.write_bytes(data)
        try:
            ckpt = SafetensorsCheckpoint([file])
            tensors = {key: ckpt.load(key) for key in ckpt.keys()}
        except ValueError as exc:
            assert str(file) in str(exc), f"the error does not name the file: {exc}"
            return None
        for key, tensor in tensors.items():  # what was accepted is consistent and bounded by the file
            assert tensor.numel() * tensor.element_size() <= len(data)
            assert tuple(tensor.shape) == ckpt.shape(key) and tensor.dtype == ckpt.dtype(key)
        return tensors


def frame(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from([*DTYPES, "F64", "X9", 7]),
    "shape": st.one_of(st.lists(st.integers(-3, 2**62), max_size=3), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-5, 2**63), min_size=2, max_size=2), json_values)})


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    read_or_refuse(data)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), st.one_of(entry, json_values), max_size=4), st.binary(max_size=64),
       st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_structured_headers(header, data, length):
    read_or_refuse(frame(header, data, length))


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "__metadata__"),
                       st.tuples(st.sampled_from(list(DTYPES)), st.lists(st.integers(0, 4), max_size=3)), max_size=4),
       st.data())
def test_valid_files_read_back_and_any_corruption_is_refused(spec, data):
    tensors = {key: torch.randint(0, 100, shape).to(DTYPES[code]) for key, (code, shape) in spec.items()}
    with tempfile.TemporaryDirectory() as folder:
        save_file(tensors, str(Path(folder) / "ok.safetensors"), metadata={"a": "b"})
        raw = (Path(folder) / "ok.safetensors").read_bytes()
    got = read_or_refuse(raw)
    assert got is not None and got.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(got[key], tensor), key
    # a truncation or a flipped byte: read exactly or refused, never anything else
    cut = data.draw(st.integers(0, len(raw)))
    read_or_refuse(raw[:cut])
    position = data.draw(st.integers(0, len(raw) - 1))
    flipped = bytearray(raw)
    flipped[position] ^= data.draw(st.integers(1, 255))
    read_or_refuse(bytes(flipped))


@pytest.mark.parametrize("header, data, why", [
    ({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 4398046511104 bytes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a list of non-negative"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "two increasing"),
    ({"w": [1, 2]}, b"", "not a mapping"),
    ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    (b"[" * 100000, b"", "unreadable header"),
])
def test_known_bad_headers(header, data, why):
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "bad.safetensors"
        file.write_bytes(frame(header, data))
        with pytest.raises(ValueError, match=why) as info:
            SafetensorsCheckpoint([file])
        assert str(file) in str(info.value)
