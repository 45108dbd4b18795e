"""tsv_fast.io: every checkpoint format in and out, atomic sinks, TSV-C files and the error paths."""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tsv_fast import io, synthetic
from tsv_fast import compress, tsv_merge
from tsv_fast.io.checkpoint import Checkpoint, DictCheckpoint


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """Odd sizes and every common dtype, so offsets in the files are not aligned."""
    g = torch.Generator().manual_seed(0)
    return {
        "module.visual.proj": torch.randn(5, 3, generator=g),
        "position_ids": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(3, generator=g).half(),
        "scalar": torch.tensor(2.5),
        "bf16.weight": torch.randn(4, 4, generator=g).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def assert_same(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt.keys()) == sorted(expected)
    for key, tensor in expected.items():
        assert ckpt.shape(key) == tuple(tensor.shape)
        assert ckpt.dtype(key) == tensor.dtype
        assert torch.equal(ckpt.load(key), tensor), key


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-vit: pretrained + 3 fine-tunes, in memory and as safetensors files."""
    pre, fts = synthetic.checkpoints("tiny-vit", 3)
    folder = tmp_path_factory.mktemp("tiny")
    save_file(pre, str(folder / "pre.safetensors"))
    for i, ft in enumerate(fts):
        save_file(ft, str(folder / f"ft{i}.safetensors"))
    return pre, fts, folder


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------
def test_safetensors_single_file_round_trip(tmp_path):
    sd = mixed_state_dict()
    out = io.save_checkpoint(sd, tmp_path / "m.safetensors", metadata={"method": "test"})
    assert out == tmp_path / "m.safetensors"
    assert_same(io.open_checkpoint(out), sd)
    back = load_file(str(out))  # the reference reader agrees byte for byte
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["method"] == "test" and f.metadata()["format"] == "pt"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporaries left


def test_sharded_output_with_index(tmp_path):
    sd = {f"layer.{i}.weight": torch.full((64, 64), float(i)) for i in range(5)}  # 16 KiB each
    index_path = io.save_checkpoint(sd, tmp_path / "out", max_shard_bytes=40_000, metadata={"alpha": "1.0"})
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    assert index_path == tmp_path / "out"
    # A transformers-style reader: weight_map -> shard file -> safetensors
    index = json.loads((tmp_path / "out" / io.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4 and index["metadata"]["alpha"] == "1.0"
    loaded = {}
    for name in set(index["weight_map"].values()):
        loaded.update(load_file(str(tmp_path / "out" / name)))
    assert {k: index["weight_map"][k] for k in loaded} == index["weight_map"]
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    # ... and our readers: the folder and the index file
    assert_same(io.open_checkpoint(tmp_path / "out"), sd)
    assert_same(io.open_checkpoint(tmp_path / "out" / io.INDEX_NAME), sd)


def test_sharded_file_path_uses_its_stem(tmp_path):
    sd = {f"w{i}": torch.ones(32, 32) * i for i in range(3)}
    out = io.save_checkpoint(sd, tmp_path / "merged.safetensors", max_shard_bytes=5000)
    assert out == tmp_path / "merged.safetensors.index.json"
    assert (tmp_path / "merged-00003-of-00003.safetensors").exists()
    assert_same(io.open_checkpoint(out), sd)


def test_hf_folder_with_single_file(tmp_path):
    sd = mixed_state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    ckpt = io.open_checkpoint(tmp_path)
    assert ckpt.name == str(tmp_path)
    assert_same(ckpt, sd)


def test_mmap_reader_agrees(tmp_path):
    sd = mixed_state_dict()
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert_same(io.SafetensorsCheckpoint([tmp_path / "m.safetensors"], mmap=True), sd)


@pytest.mark.parametrize("nested", [None, "state_dict", "model"])
def test_torch_state_dict_files(tmp_path, nested):
    sd = {k: v for k, v in mixed_state_dict().items()}
    obj = sd if nested is None else {nested: sd, "epoch": 3, "optimizer_lr": 0.1}
    torch.save(obj, tmp_path / "ckpt.pt")
    assert_same(io.open_checkpoint(tmp_path / "ckpt.pt"), sd)


def test_legacy_torch_format_and_bin_folder(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(3)}
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same(io.open_checkpoint(tmp_path), sd)


def test_sharded_torch_bin_index(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-1.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-2.bin")
    (tmp_path / io.TORCH_INDEX_NAME).write_text(json.dumps(
        {"weight_map": {"a": "pytorch_model-1.bin", "b": "pytorch_model-2.bin"}}))
    assert_same(io.open_checkpoint(tmp_path), {"a": torch.ones(2), "b": torch.zeros(3)})


def test_out_dtype_cast_keeps_integer_buffers(tmp_path):
    sd = {"w": torch.randn(3, 3), "ids": torch.arange(4)}
    sink = io.SafetensorsSink(tmp_path / "o.safetensors", out_dtype=torch.bfloat16)
    for key, value in sd.items():
        sink.write(key, value)
    sink.close({})
    back = load_file(str(tmp_path / "o.safetensors"))
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], sd["w"].bfloat16())
    assert back["ids"].dtype == torch.int64


# ------------------------------------------------------------------------------------------------
# Pickles
# ------------------------------------------------------------------------------------------------
def test_pickled_module_refused_then_opt_in(tmp_path):
    module = torch.nn.Linear(3, 2)
    torch.save(module, tmp_path / "model.pt")
    with pytest.raises(ValueError) as info:
        io.open_checkpoint(tmp_path / "model.pt")
    message = str(info.value)
    assert str(tmp_path / "model.pt") in message and "allow_pickle=True" in message and "--allow-pickle" in message
    with pytest.warns(UserWarning, match="arbitrary Python code"):
        ckpt = io.open_checkpoint(tmp_path / "model.pt", allow_pickle=True)
    assert_same(ckpt, dict(module.state_dict()))


def test_convert_pickle_to_safetensors(tmp_path):
    module = torch.nn.Linear(4, 2)
    torch.save(module, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="allow_pickle"):
        io.convert(tmp_path / "model.pt", tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        io.convert(tmp_path / "model.pt", tmp_path / "model.safetensors", allow_pickle=True)
    assert_same(io.open_checkpoint(tmp_path / "model.safetensors"), dict(module.state_dict()))


def test_non_tensor_entries_are_named(tmp_path):
    torch.save({"w": torch.ones(2), "step": 5}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="step"):
        io.open_checkpoint(tmp_path / "x.pt")


# ------------------------------------------------------------------------------------------------
# Streaming merges through files
# ------------------------------------------------------------------------------------------------
def test_streamed_merge_equals_in_memory(tiny, tmp_path):
    pre, fts, folder = tiny
    expected = tsv_merge(pre, fts)
    paths = [folder / f"ft{i}.safetensors" for i in range(3)]
    sink = io.SafetensorsSink(tmp_path / "merged", max_shard_bytes=100_000, inputs=[folder / "pre.safetensors", *paths])
    out = tsv_merge(str(folder / "pre.safetensors"), [str(p) for p in paths], sink=sink)
    assert out == tmp_path / "merged" and len(sink.files) > 1
    merged = io.open_checkpoint(out)
    assert_same(merged, expected)
    with safe_open(str(sink.files[0]), "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "tsv-m" and meta["num_tasks"] == "3" and meta["alpha"] == "1.0"


def test_interrupted_merge_leaves_nothing_and_keeps_inputs(tiny, tmp_path):
    pre, fts, folder = tiny
    before = digest(folder)
    (tmp_path / "merged.safetensors").write_bytes(b"previous result")

    class Interrupting(DictCheckpoint):
        calls = 0

        def load(self, key):
            Interrupting.calls += 1
            if Interrupting.calls > 20:
                raise KeyboardInterrupt
            return super().load(key)

    sink = io.SafetensorsSink(tmp_path / "merged.safetensors")
    with pytest.raises(KeyboardInterrupt):
        tsv_merge(str(folder / "pre.safetensors"), [Interrupting(fts[0], "ft0"), *fts[1:]], sink=sink)
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]  # no temporaries
    assert (tmp_path / "merged.safetensors").read_bytes() == b"previous result"  # old output untouched
    assert digest(folder) == before


def test_abort_removes_finished_shards(tmp_path):
    sink = io.SafetensorsSink(tmp_path / "out", max_shard_bytes=100)
    for i in range(4):
        sink.write(f"w{i}", torch.ones(30))
    sink.abort()
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder, no lock


def test_output_equal_to_input_is_refused(tiny):
    _, _, folder = tiny
    for target, inputs in [(folder / "ft0.safetensors", [folder / "ft0.safetensors"]),
                           (folder / "pre.safetensors", [io.open_checkpoint(folder / "pre.safetensors")])]:
        with pytest.raises(ValueError, match="overwrite input"):
            io.SafetensorsSink(target, inputs=inputs)


def test_output_folder_equal_to_input_folder_is_refused(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="overwrite input"):
        io.SafetensorsSink(tmp_path, inputs=[tmp_path])


def test_not_enough_disk_space_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(OSError, match="not enough disk space") as info:
        io.SafetensorsSink(tmp_path / "o.safetensors", expected_bytes=10**6)
    assert info.value.errno == errno.ENOSPC


def test_disk_filling_during_write_cleans_up(tmp_path, monkeypatch):
    sink = io.SafetensorsSink(tmp_path / "o.safetensors")
    sink.write("w", torch.ones(1000))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(OSError, match="not enough disk space"):
        sink.close({})
    assert list(tmp_path.iterdir()) == []


def test_enospc_from_the_os_is_reported(tmp_path, monkeypatch):
    sink = io.SafetensorsSink(tmp_path / "o.safetensors")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.safetensors, "_tensor_bytes", full)
    with pytest.raises(OSError, match="disk full while writing"):
        sink.write("w", torch.ones(3))
    sink.abort()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Error paths of the inputs
# ------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        io.open_checkpoint(tmp_path / "nope.safetensors")


def test_missing_shard(tmp_path):
    io.save_checkpoint({f"w{i}": torch.ones(100) for i in range(3)}, tmp_path / "m", max_shard_bytes=500)
    (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
        io.open_checkpoint(tmp_path / "m")


def test_truncated_and_garbage_files(tmp_path):
    save_file({"w": torch.ones(1000)}, str(tmp_path / "t.safetensors"))
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        io.open_checkpoint(tmp_path / "t.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        io.open_checkpoint(tmp_path / "g.safetensors")


def test_ambiguous_folder(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="cannot tell which file"):
        io.open_checkpoint(tmp_path)


def test_different_architectures_name_the_files(tiny, tmp_path):
    pre, fts, folder = tiny
    missing = dict(fts[1])
    dropped = next(k for k in missing if k.endswith("mlp.c_fc.weight"))
    del missing[dropped]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError) as info:
        tsv_merge(str(folder / "pre.safetensors"), [str(folder / "ft0.safetensors"), str(tmp_path / "missing.safetensors")])
    assert "missing.safetensors" in str(info.value) and dropped in str(info.value)
    assert "pre.safetensors" in str(info.value)

    reshaped = dict(fts[1])
    reshaped[dropped] = torch.zeros(reshaped[dropped].shape[0], 7)
    save_file(reshaped, str(tmp_path / "reshaped.safetensors"))
    with pytest.raises(ValueError) as info:
        tsv_merge(str(folder / "pre.safetensors"), [str(tmp_path / "reshaped.safetensors")])
    assert "reshaped.safetensors" in str(info.value) and dropped in str(info.value) and "shape" in str(info.value)


def test_mixed_dtypes_warn_and_keep_the_base_dtype(tiny, tmp_path):
    pre, fts, folder = tiny
    save_file({k: v.bfloat16() for k, v in fts[0].items()}, str(tmp_path / "bf16.safetensors"))
    with pytest.warns(UserWarning, match="different dtypes"):
        merged = tsv_merge(str(folder / "pre.safetensors"), [str(tmp_path / "bf16.safetensors"),
                                                              str(folder / "ft1.safetensors")])
    assert all(t.dtype == torch.float32 for t in merged.values())


def test_nan_names_key_and_file(tiny, tmp_path):
    pre, fts, folder = tiny
    bad = dict(fts[0])
    key = next(k for k in bad if k.endswith("attn.out_proj.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    sink = io.SafetensorsSink(tmp_path / "out.safetensors")
    with pytest.raises(ValueError) as info:
        tsv_merge(str(folder / "pre.safetensors"), [str(tmp_path / "nan.safetensors")], sink=sink)
    assert key in str(info.value) and "nan.safetensors" in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# TSV-C files
# ------------------------------------------------------------------------------------------------
def test_compressed_round_trip_and_storage(tiny, tmp_path):
    pre, fts, folder = tiny
    packed = compress(pre, fts)
    storage = io.save_compressed(tmp_path / "tasks.tsvc", packed)
    back = io.load_compressed(tmp_path / "tasks.tsvc")
    assert back.num_tasks == 3 and back.shapes == packed.shapes and back.dtypes == packed.dtypes
    assert back.factors.keys() == packed.factors.keys() and back.others.keys() == packed.others.keys()
    for key, (u, s, v) in packed.factors.items():
        assert all(torch.equal(a, b) for a, b in zip((u, s, v), back.factors[key]))
    for task in range(3):
        rebuilt, expected = back.reconstruct(task, pre), packed.reconstruct(task, pre)
        assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
    # exact accounting: numbers and bytes of the stored tensors, plus the header
    numbers = sum(t.numel() for f in packed.factors.values() for t in f) + sum(t.numel() for t in packed.others.values())
    assert storage["stored_numbers"] == numbers and storage["tensor_bytes"] == numbers * 4
    header = io.read_compressed_header(tmp_path / "tasks.tsvc")
    header_bytes = int.from_bytes((tmp_path / "tasks.tsvc").read_bytes()[:8], "little")
    assert storage["file_bytes"] == 8 + header_bytes + storage["tensor_bytes"]
    assert header["format"] == "tsv-c" and header["num_tasks"] == 3
    key = next(iter(packed.factors))
    assert header["keys"][key]["k"] == packed.factors[key][0].shape[-1]
    with safe_open(str(tmp_path / "tasks.tsvc"), "pt") as f:  # each task's factors are their own tensors
        u0 = f.get_tensor(f"task0::{key}::U")
    assert torch.equal(u0, packed.factors[key][0][0])


def test_load_compressed_rejects_plain_safetensors(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a TSV-C file"):
        io.load_compressed(tmp_path / "plain.safetensors")


def test_parse_dtype():
    from tsv_fast.options import parse_dtype

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="unknown or unsupported dtype"):
        parse_dtype("float7")


# ------------------------------------------------------------------------------------------------
# The engine's read-ahead thread
# ------------------------------------------------------------------------------------------------
def test_read_error_in_the_read_ahead_reaches_the_caller(tiny):

    pre, fts, _ = tiny

    class Broken(DictCheckpoint):
        def load(self, key):
            if key.endswith("mlp.c_fc.weight"):
                raise OSError("disk read error")
            return super().load(key)

    with pytest.raises(OSError, match="disk read error"):
        tsv_merge(DictCheckpoint(pre, "pre"), [Broken(fts[0], "broken"), *map(DictCheckpoint, fts[1:])])
