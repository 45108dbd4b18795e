"""Factored task libraries: merging from TSV-C files (tsv_fast.merge_compressed, tsv-fast merge
tasks.tsvc --tasks), adding tasks to them (append_tasks, tsv-fast compress --append), and TSV-C / STI
on LoRA adapters without dense task vectors."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tsv_fast
from tsv_fast import io
from tsv_fast.testing import assert_rel_close, assert_same_result

from tiny_models import save_tiny
from test_cli import cli
from test_lora import dense_finetunes, make_adapters, make_base, save_adapter

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("library")
    pre, fts, paths = save_tiny(folder, 4)
    return pre, fts, folder, paths


def matrices(pre):
    return [k for k, v in pre.items() if v.dim() == 2]


def assert_equal_merge(name, got, want, pre):
    """Equal up to the float32 rounding of W (the stored factors are float32)."""
    assert got.keys() == want.keys()
    for key in want:
        assert_rel_close(f"{name} {key}: W", got[key], want[key], 1e-6)
        if not torch.equal(want[key], pre[key]):
            assert_rel_close(f"{name} {key}: W - W_pre", got[key] - pre[key], want[key] - pre[key], 1e-5)


@pytest.mark.parametrize("tasks", [[0, 2], None])
def test_merging_from_a_library_equals_merging_the_fine_tunes(tiny, tmp_path, tasks):
    pre, fts, _, _ = tiny
    io.save_compressed(tmp_path / "lib.tsvc", tsv_fast.compress(pre, fts[:3], rank_fraction=0.5))
    chosen = [0, 1, 2] if tasks is None else tasks
    got, report = tsv_fast.merge_compressed(pre, tmp_path / "lib.tsvc", tasks=tasks, alpha=0.8, return_report=True)
    want = tsv_fast.tsv_merge(pre, [fts[i] for i in chosen], alpha=0.8)  # k = r/2 or r/3 <= the stored r/2
    assert_equal_merge(f"tasks {chosen}", got, want, pre)
    assert {key: layer.k for key, layer in report.layers.items()} == {
        key: int(min(pre[key].shape) / len(chosen)) for key in matrices(pre)}


def test_a_library_caps_k_at_its_stored_rank_and_says_so(tiny, tmp_path):
    """Stored k = r/4 < the rule's r/2 for two tasks: the merge takes what is stored, which is the
    merge of the fine-tunes at rank_fraction 1/4, and its metadata says which k each matrix got."""
    pre, fts, _, _ = tiny
    io.save_compressed(tmp_path / "lib.tsvc", tsv_fast.compress(pre, fts, rank_fraction=0.25))
    sink_path = tmp_path / "merged.safetensors"
    tsv_fast.merge_compressed(pre, tmp_path / "lib.tsvc", tasks=[1, 3], sink=io.SafetensorsSink(sink_path))
    want = tsv_fast.tsv_merge(pre, [fts[1], fts[3]], rank_fraction=0.25)
    assert_equal_merge("capped", load_file(str(sink_path)), want, pre)
    with safe_open(str(sink_path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["library_tasks"]) == [1, 3] and "min(stored k" in meta["k_rule"]
    assert json.loads(meta["k_per_task"]) == {key: int(min(pre[key].shape) * 0.25) for key in matrices(pre)}


@pytest.mark.parametrize("method", ["iso-c", "iso-cts", "ta"])
def test_a_lossless_library_merges_like_the_fine_tunes_with_every_method(tiny, method):
    """With k = r stored (rank_fraction 1) a library holds the task vectors exactly (up to float32)."""
    pre, fts, _, _ = tiny
    packed = tsv_fast.compress(pre, fts[:3], rank_fraction=1.0)
    got = tsv_fast.merge_compressed(pre, packed, method=method)
    assert_equal_merge(method, got, tsv_fast.merge(pre, fts[:3], method=method), pre)


def test_cli_merge_from_a_library(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    assert cli("compress", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "lib.tsvc",
               "--rank-fraction", "0.5").returncode == 0
    result = cli("merge", "-b", folder / "pre.safetensors", tmp_path / "lib.tsvc", "--tasks", "0,3",
                 "-o", tmp_path / "out.safetensors", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "tasks of" in result.stdout
    want = tsv_fast.tsv_merge(pre, [fts[0], fts[3]])
    assert_equal_merge("cli", load_file(str(tmp_path / "out.safetensors")), want, pre)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:  # the file states the tasks and each k
        meta = f.metadata()
    assert json.loads(meta["library_tasks"]) == [0, 3] and meta["method"] == "tsv-m"
    assert json.loads(meta["k_per_task"]) == {key: int(min(pre[key].shape) / 2) for key in matrices(pre)}
    bad = cli("merge", "-b", folder / "pre.safetensors", tmp_path / "lib.tsvc", "--tasks", "0,4",
              "-o", tmp_path / "bad.safetensors")
    assert bad.returncode != 0 and "0 … 3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    other = cli("merge", "-b", folder / "pre.safetensors", *paths, "--tasks", "0", "-o", tmp_path / "x.safetensors")
    assert other.returncode != 0 and "TSV-C library" in other.stderr


def tensor_bytes(path) -> dict[str, bytes]:
    """The raw bytes of every tensor of a safetensors file, read from its header's offsets."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    return {key: data[8 + length + info["data_offsets"][0]: 8 + length + info["data_offsets"][1]]
            for key, info in header.items()}


def test_append_copies_the_stored_tasks_byte_for_byte(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    library = tmp_path / "lib.tsvc"
    assert cli("compress", "-b", folder / "pre.safetensors", *paths[:2], "-o", library).returncode == 0
    before = tensor_bytes(library)
    result = cli("compress", "--append", library, "-b", folder / "pre.safetensors", *paths[2:])
    assert result.returncode == 0, result.stderr
    after = tensor_bytes(library)
    assert all(after[name] == raw for name, raw in before.items())  # the stored tasks, untouched
    assert len(after) == 2 * len(before)
    header = io.read_compressed_header(library)
    assert header["num_tasks"] == 4 and json.loads(header["metadata"]["models"]) == [p.name for p in paths]
    # the new tasks at the library's ranks (k = r/2 of the first two): as if compressed with them
    stored = io.load_compressed(library)
    fresh = tsv_fast.compress(pre, fts[2:], rank_fraction=0.5)
    for task in (2, 3):
        got, want = stored.task_vector(task), fresh.task_vector(task - 2)
        for key in pre:
            assert_rel_close(f"task {task} {key}", got[key], want[key], 1e-6)
    assert_equal_merge("appended", tsv_fast.merge_compressed(pre, library, tasks=[0, 3], rank_fraction=0.5),
                       tsv_fast.tsv_merge(pre, [fts[0], fts[3]], rank_fraction=0.5), pre)
    refused = cli("compress", "--append", library, "-b", folder / "pre.safetensors", paths[0], "--rank-fraction", "0.1")
    assert refused.returncode != 0 and "--rank-fraction" in refused.stderr


@pytest.fixture
def lora_inputs(tmp_path):
    base = make_base()
    adapters = make_adapters(base)
    paths = [save_adapter(tmp_path / f"a{i}", cfg, t, dtype=F64) for i, (cfg, t, _) in enumerate(adapters)]
    floats = {k: v for k, v in base.items() if v.is_floating_point()}
    fts = [{k: ft[k] for k in floats} for ft in dense_finetunes(base, adapters)]
    return base, floats, fts, paths


def test_compress_and_interference_of_adapters_equal_those_of_the_dense_fine_tunes(lora_inputs):
    base, floats, fts, paths = lora_inputs
    packed = tsv_fast.compress(base, paths, compute_dtype=F64, storage_dtype=F64)
    dense = tsv_fast.compress(floats, fts, compute_dtype=F64, storage_dtype=F64)
    for task in range(3):
        got, want = packed.task_vector(task), dense.task_vector(task)
        for key in floats:
            assert_rel_close(f"task {task} {key}", got[key], want[key], 1e-10)
    # adapters store Σ min(k, rₜ) columns, never more: q_proj has k = 8 but ranks 4 and 6
    assert packed.factors["model.layers.0.self_attn.q_proj.weight"][0].shape[-1] == 6
    sti = tsv_fast.interference(base, paths)
    want = tsv_fast.interference(floats, fts)
    assert sti.keys() == want.keys() and len(sti) >= 4
    for key in want:
        assert sti[key] == pytest.approx(want[key], rel=1e-8, abs=1e-12)


def test_appending_an_adapter_that_changes_a_new_module(lora_inputs, tmp_path):
    """Adapter 2 touches only c_attn, which no stored adapter changed: the stored tasks get zero
    factors there (their update is zero), and the library equals compressing all three at once."""
    base, floats, fts, paths = lora_inputs
    library = tmp_path / "lib.tsvc"
    io.save_compressed(library, tsv_fast.compress(base, paths[:2], compute_dtype=F64, storage_dtype=F64,
                                                  rank_fraction=1 / 3))
    before = tensor_bytes(library)
    tsv_fast.append_tasks(library, base, paths[2:], compute_dtype=F64)
    after = tensor_bytes(library)
    assert all(after[name] == raw for name, raw in before.items())
    key = "model.layers.0.mlp.c_attn.weight"
    assert io.read_compressed_header(library)["keys"][key]["kind"] == "factors"
    whole = tsv_fast.compress(base, paths, compute_dtype=F64, storage_dtype=F64)
    stored = io.load_compressed(library)
    for task in range(3):
        for k in floats:
            assert_rel_close(f"task {task} {k}", stored.task_vector(task)[k], whole.task_vector(task)[k], 1e-10)


def test_cli_compress_and_interference_accept_adapter_folders(lora_inputs, tmp_path):
    base, floats, fts, paths = lora_inputs
    save_file({k: v.float() if v.is_floating_point() else v for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    result = cli("compress", "-b", tmp_path / "base.safetensors", *paths, "-o", tmp_path / "lib.tsvc")
    assert result.returncode == 0, result.stderr
    stored = io.load_compressed(tmp_path / "lib.tsvc")
    want = tsv_fast.compress(tmp_path / "base.safetensors", paths)
    for key in floats:
        assert_same_result(key, stored.task_vector(1)[key], want.task_vector(1)[key])
    sti = cli("interference", "-b", tmp_path / "base.safetensors", *paths, "-o", tmp_path / "sti.json",
              "--heatmap", tmp_path / "heat.png", "--layer", "model.layers.0.self_attn.q_proj.weight")
    assert sti.returncode == 0, sti.stderr
    got = json.loads((tmp_path / "sti.json").read_text())["per_layer"]
    for key, value in tsv_fast.interference(tmp_path / "base.safetensors", paths).items():
        assert got[key] == pytest.approx(value, rel=1e-5)
    assert (tmp_path / "heat.png").stat().st_size > 0


def test_adapters_are_never_densified(lora_inputs, monkeypatch):
    """TSV-C, STI and merged adapters (every method) of LoRA adapters work from the factors: no m×n
    task vector of a LoRA matrix and no m×n sum of factored tasks is ever formed (conv kernels and
    weights an adapter saves whole are dense by nature and stay allowed)."""
    from tsv_fast.engine.adapters import AdapterChunk
    from tsv_fast.io.peft import LoraFactor

    base, floats, fts, paths = lora_inputs
    dense, task_sum = LoraFactor.dense, AdapterChunk.task_sum

    def no_dense(self, dtype=torch.float32):
        assert len(self.shape()) != 2, f"a LoRA matrix of shape {self.shape()} was densified"
        return dense(self, dtype)

    def no_sum(self):
        assert not self.factored_only, f"the sum of factored tasks of {self.keys} was densified"
        return task_sum(self)

    monkeypatch.setattr(LoraFactor, "dense", no_dense)
    monkeypatch.setattr(AdapterChunk, "task_sum", no_sum)
    packed = tsv_fast.compress(base, paths)
    assert packed.factors["model.layers.0.self_attn.q_proj.weight"][0].shape[-1] == 6
    assert len(tsv_fast.interference(base, paths)) >= 4
    for method in ("tsv-m", "iso-c", "iso-cts", "ta"):
        adapter = tsv_fast.lora_tsv_merge(base, paths, method=method, output="adapter", max_rank=5)
        assert max(adapter.ranks.values()) == 5, method


def test_a_merged_adapter_in_the_output_dtype(lora_inputs, tmp_path):
    """out_dtype (--out-dtype) holds for a merged adapter too: its factors and whole weights."""
    base, floats, fts, paths = lora_inputs
    adapter = tsv_fast.lora_tsv_merge(base, paths, output="adapter", out_dtype=torch.bfloat16)
    assert {t.dtype for t in adapter.tensors.values()} == {torch.bfloat16}
    want = tsv_fast.lora_tsv_merge(base, paths, output="adapter", compute_dtype=F64)
    got = {k: t.double() for k, t in adapter.tensors.items()}
    assert got.keys() == want.tensors.keys()
    for key, tensor in want.tensors.items():  # each update B A (factors: up to signs), whole weights as they are
        if "_A" in key:
            continue
        pair = key.replace("_B", "_A")
        if "_B" in key:
            assert_rel_close(key, got[key] @ got[pair], tensor @ want.tensors[pair], 1e-2)
        else:
            assert_rel_close(key, got[key], tensor, 1e-2)


def test_a_library_reads_only_the_chosen_tasks(tiny, tmp_path):
    """Merging tasks 1 and 3 of a 4-task file reads their stored tensors once each, nothing of the others."""
    pre, fts, _, _ = tiny
    path = tmp_path / "lib.tsvc"
    io.save_compressed(path, tsv_fast.compress(pre, fts, rank_fraction=0.5))
    library = io.TsvcLibrary(path)
    tsv_fast.merge_compressed(pre, library, tasks=[1, 3])
    stored = tensor_bytes(path)
    chosen = sum(len(raw) for name, raw in stored.items() if name.startswith(("task1::", "task3::")))
    assert 0 < library.bytes_read == chosen < sum(len(raw) for raw in stored.values()) / 1.5


@pytest.mark.parametrize("line, words", [
    ("tasks: [0, -2]", ["tasks", "a list of whole numbers"]),
    ("tasks: 3", ["tasks", "a list of whole numbers"]),
    ("as_adapter: 'yes'", ["as_adapter", "true or false"]),
    ("max_rank: 2.5", ["max_rank", "whole number"]),
])
def test_config_keys_of_factored_merges_are_typed(tmp_path, line, words):
    config = tmp_path / "c.yaml"
    config.write_text("base_model: pre.safetensors\nmodels: [a.tsvc]\noutput: o.safetensors\n" + line + "\n")
    result = cli("merge", "-c", config)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
