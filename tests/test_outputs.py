"""Every output: never over an input (one guard), whole or not at all, one writer at a time, finite."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tsv_fast
from tsv_fast import io, synthetic
from tsv_fast.io import outputs
from tsv_fast.io.sink import SafetensorsSink


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsv_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def models(tmp_path):
    """An HF-style sharded base folder, two fine-tunes as files, and a sharded fine-tune folder."""
    pre, fts = synthetic.checkpoints("tiny-vit", 3)
    io.save_checkpoint(pre, tmp_path / "base", max_shard_bytes=60_000)
    (tmp_path / "base" / "config.json").write_text("{}")
    io.save_checkpoint(fts[0], tmp_path / "ft0.safetensors")
    io.save_checkpoint(fts[1], tmp_path / "ft1.safetensors")
    io.save_checkpoint(fts[2], tmp_path / "ft2", max_shard_bytes=60_000)
    inputs = [tmp_path / "base", tmp_path / "ft0.safetensors", tmp_path / "ft1.safetensors",
              tmp_path / "ft2" / io.INDEX_NAME]
    return tmp_path, inputs


def bad_targets(root: Path) -> list[Path]:
    shard = sorted((root / "ft2").glob("model-*.safetensors"))[0]
    (root / "link.safetensors").symlink_to(root / "ft0.safetensors")
    return [root / "ft0.safetensors",                      # an input file
            root / "sub" / ".." / "ft1.safetensors",       # the same through ..
            root / "link.safetensors",                     # the same through a symlink
            shard,                                         # a shard named by an input index
            root / "base" / "merged.safetensors",          # inside an input model folder
            root / "ft2" / "report.json",                  # inside the folder of an input index
            root / "base",                                 # an input folder itself
            root]                                          # a folder that holds inputs


def test_the_guard_refuses_every_path_that_touches_an_input(models):
    root, inputs = models
    (root / "sub").mkdir()
    for target in bad_targets(root):
        with pytest.raises(ValueError, match="overwrite input|inside the input model folder"):
            outputs.check_output(target, inputs)
    assert outputs.check_output(root / "out" / "merged.safetensors", inputs)  # elsewhere is fine
    assert outputs.check_output(root / "merged.safetensors", inputs)  # beside single-file inputs too


@pytest.mark.parametrize("command", ["merge -o", "merge --report", "compress", "interference -o",
                                     "interference --plot", "interference --heatmap", "reconstruct", "convert"])
def test_every_writer_uses_the_guard(models, command):
    """Each command refuses an output over one of its inputs and one inside an input model folder
    with one line, and every file stays byte-identical (all bad paths: the test above)."""
    root, inputs = models
    base, fts = inputs[0], inputs[1:]
    shard = sorted((root / "ft2").glob("model-*.safetensors"))[0]
    if command == "reconstruct":
        io.save_compressed(root / "tasks.tsvc", tsv_fast.compress(str(base), [str(p) for p in fts]))
        targets = [root / "tasks.tsvc", base / "task0.safetensors"]
    elif command == "convert":
        targets = [shard, root / "ft2" / "converted.safetensors"]
    else:
        targets = [shard, base / "out.safetensors"]
    before = digest(root)
    for target in targets:
        args = {"merge -o": ["merge", "-b", base, *fts, "-o", target, "--no-progress"],
                "merge --report": ["merge", "-b", base, *fts, "-o", root / "m.safetensors", "--report", target,
                                   "--no-progress"],
                "compress": ["compress", "-b", base, *fts, "-o", target],
                "interference -o": ["interference", "-b", base, *fts, "-o", target],
                "interference --plot": ["interference", "-b", base, *fts, "-o", root / "s.json", "--plot", target],
                "interference --heatmap": ["interference", "-b", base, *fts, "-o", root / "s.json", "--heatmap", target],
                "reconstruct": ["reconstruct", root / "tasks.tsvc", "-t", "0", "-b", base, "-o", target],
                "convert": ["convert", root / "ft2" / io.INDEX_NAME, target]}[command]
        result = cli(*args)
        assert result.returncode == 1, (command, target, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "input" in result.stderr, result.stderr
        assert digest(root) == before, f"{command} -> {target} changed a file"


def test_remerge_into_a_sharded_output_leaves_exactly_the_new_model(tmp_path):
    old = {f"w{i}": torch.full((100,), float(i)) for i in range(6)}
    io.save_checkpoint(old, tmp_path / "out", max_shard_bytes=1000)  # a folder with 3 shards + index
    new = {"v": torch.ones(10)}
    io.save_checkpoint(new, tmp_path / "out")  # one model.safetensors, nothing else
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no lock
    assert load_file(str(tmp_path / "out" / "model.safetensors")).keys() == {"v"}
    # a .safetensors file target whose earlier output was sharded beside it
    io.save_checkpoint(old, tmp_path / "m.safetensors", max_shard_bytes=1000)
    assert len(list(tmp_path.glob("m-*.safetensors"))) == 3
    io.save_checkpoint(new, tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out"]


def test_a_folder_tsv_fast_did_not_write_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="holds files tsv_fast did not write"):
        io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    save_file({"w": torch.ones(3)}, str(tmp_path / "x-00001-of-00002.safetensors"))  # someone else's shard
    with pytest.raises(ValueError, match="belongs to another model"):
        io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "x.safetensors")


@pytest.mark.parametrize("exchange", [True, False])
def test_commit_swaps_the_whole_folder(tmp_path, monkeypatch, exchange):
    """Until commit the old output is whole and untouched; after it the new one, nothing mixed."""
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    io.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "out", max_shard_bytes=8)
    (tmp_path / "out" / "config.json").write_text("{}")  # not ours, but inside our earlier output
    before = digest(tmp_path / "out")
    sink = SafetensorsSink(tmp_path / "out")
    sink.write("v", torch.ones(4))
    assert digest(tmp_path / "out") == before  # nothing of the new output is visible yet
    sink.close({})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_writer_of_the_same_output_fails_at_once(tmp_path):
    first = outputs.Output(tmp_path / "out.safetensors", folder=False)
    started = time.perf_counter()
    with pytest.raises(outputs.OutputLocked, match=rf"being written by pid {os.getpid()} on "):
        outputs.Output(tmp_path / "out.safetensors", folder=False)
    assert time.perf_counter() - started < 1
    first.abort()
    outputs.Output(tmp_path / "out.safetensors", folder=False).abort()  # free again
    # a lock file left by a writer that died (no flock held) is taken over
    (tmp_path / ".out.safetensors.tsv-fast.lock").write_text("pid 1 on elsewhere since long ago")
    outputs.Output(tmp_path / "out.safetensors", folder=False).abort()
    assert list(tmp_path.iterdir()) == []


def test_a_merge_into_an_output_being_written_fails_at_once(models, tmp_path):
    """Another process holds the output (here this test process, deterministic where two racing
    merges are not): the command fails at once with one line naming the holder, and leaves it alone."""
    root, inputs = models
    holder = outputs.Output(tmp_path / "same", folder=True)
    try:
        started = time.perf_counter()
        second = cli("merge", "-b", inputs[0], *inputs[1:], "-o", tmp_path / "same", "--no-progress")
        assert second.returncode == 1 and f"is being written by pid {os.getpid()}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and time.perf_counter() - started < 60
        assert holder.staging.is_dir() and not (tmp_path / "same").exists()
    finally:
        holder.abort()


def test_outputs_are_finite_or_refused(tmp_path):
    sink = SafetensorsSink(tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match=r"'w' \(2, 3\) has 1 NaN/Inf"):
        sink.write("w", torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]]))
    sink.abort()
    sink = SafetensorsSink(tmp_path / "o.safetensors", out_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"2 value\(s\) overflow float16 \(largest \|x\| = 1e\+05"):
        sink.write("w", torch.tensor([1e5, -7e4, 1.0]))
    sink.abort()
    with pytest.raises(ValueError, match="not floating point"):
        SafetensorsSink(tmp_path / "o.safetensors", out_dtype=torch.int8)
    assert list(tmp_path.iterdir()) == []


def test_tsvc_and_reports_are_written_whole(models, tmp_path):
    root, inputs = models
    packed = tsv_fast.compress(str(inputs[0]), [str(p) for p in inputs[1:]])
    io.save_compressed(tmp_path / "t.tsvc", packed, inputs=inputs)
    with pytest.raises(ValueError, match="inside the input model folder"):
        io.save_compressed(inputs[0] / "t.tsvc", packed, inputs=inputs)
    io.write_file(tmp_path / "r.json", json.dumps({"a": 1}))
    assert (tmp_path / "r.json").is_file() and (tmp_path / "t.tsvc").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder, no lock


def test_an_aborted_output_leaves_no_folder_it_created(tmp_path):
    """A refused or interrupted output must not leave the folders made for it (an empty `merged/`
    parent is the first thing a user would see)."""
    out = outputs.Output(tmp_path / "a" / "b" / "merged.safetensors")
    assert (tmp_path / "a" / "b").is_dir()
    out.abort()
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="refused"):
        with outputs.Output(tmp_path / "kept" / "new" / "merged"):
            raise RuntimeError("refused")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and not any((tmp_path / "kept").iterdir())
    written = outputs.write_file(tmp_path / "c" / "d" / "sti.json", "{}")
    assert written.read_text() == "{}" and sorted(p.name for p in (tmp_path / "c" / "d").iterdir()) == ["sti.json"]
