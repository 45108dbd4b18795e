"""Merges over several processes (engine.partition, engine.distributed, io.parts, cli.ranks).

N ranks (torchrun, gloo) or N ``--shard`` parts must give the one-process output, tensor by tensor and
in metadata; a rank that fails leaves no output and stops the others; ``finalize`` refuses missing
parts and parts of different plans. One test runs the real ``torchrun``; the others start their ranks
by forking this process (``launch``: the environment torchrun sets, the command line called in the
child), which skips two interpreter starts and torch imports per run. The plan split and the pieces
of a run in one process: test_partition.py.

Equality: keys combined elementwise or passed through are computed key by key, the same way in every
process, and compared bitwise. Factored keys are compared with ``testing.assert_same_result``: a rank
batches other sets of same-shape layers into its chunks than one process does, and a BLAS may block a
batched product differently for another batch size (a reordered float32 sum).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tsv_fast import io
from tsv_fast.cli import app
from tsv_fast.engine.partition import Part
from tsv_fast.engine.plan import make_plan
from tsv_fast.engine.sources import DenseTasks
from tsv_fast.io.outputs import STAGING_PREFIX, safetensors_metadata
from tsv_fast.io.tsvc import load_compressed, read_compressed_header
from tsv_fast.methods import get_method
from tsv_fast.options import Options, is_merged_as_matrix
from tsv_fast.testing import assert_same_result

from test_lora import make_adapters, make_base, save_adapter
from tiny_models import save_tiny

EXCLUDE = ("text_projection",)


# ------------------------------------------------------------------------------------------------
# Launching ranks
# ------------------------------------------------------------------------------------------------
@dataclass
class Rank:
    code: int
    log: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, args: list[str], log: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # not pytest's capture of the parent
    code = 0
    try:
        returned = app(args, prog_name="tsv-fast", standalone_mode=False)  # click returns typer.Exit's code
        code = returned if type(returned) is int else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - the test reads it from the log
        print(f"uncaught {type(exc).__name__}: {exc}")
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(args: list, tmp_path: Path, world: int = 2) -> list[Rank]:
    """The command line on ``world`` ranks (world 1: one plain process), as torchrun would start it."""
    port, ctx = _free_port(), multiprocessing.get_context("fork")
    logs = [str(tmp_path / f"rank{rank}-{port}.log") for rank in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(rank, world, port, [str(a) for a in args], logs[rank]))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        if proc.exitcode is None:
            proc.kill()
    return [Rank(proc.exitcode, Path(log).read_text()) for proc, log in zip(procs, logs)]


def ok(ranks: list[Rank]) -> None:
    assert all(r.code == 0 for r in ranks), "\n".join(r.log for r in ranks)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX) or p.name.endswith(".lock")]


# ------------------------------------------------------------------------------------------------
# Inputs and comparisons
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-vit, T = 3, on disk (its 2-D keys factored, the rest averaged)."""
    folder = tmp_path_factory.mktemp("dist")
    _, _, paths = save_tiny(folder, 3)
    return folder / "pre.safetensors", paths


def index_of(output: Path) -> Path:
    """Where the index of a model output is (a folder's, or the one beside a .safetensors file)."""
    if output.is_dir():
        return output / io.INDEX_NAME
    return output.parent / (output.name[: -len(".safetensors")] + io.outputs.INDEX_SUFFIX)


def files_of(output: Path) -> list[Path]:
    """The weight files of a model output (folder or file, sharded or not)."""
    if index_of(output).is_file():
        names = json.loads(index_of(output).read_text())["weight_map"].values()
        return sorted({index_of(output).parent / name for name in names})
    return sorted(output.glob("*.safetensors")) if output.is_dir() else [output]


def index_metadata(output: Path) -> dict | None:
    return json.loads(index_of(output).read_text())["metadata"] if index_of(output).is_file() else None


def opened(output: Path):
    return io.open_checkpoint(output if output.is_dir() or not index_of(output).is_file() else index_of(output))


def stored_keys(output: Path) -> list[str]:
    """Every key of every weight file the output left on disk (a key stored twice appears twice)."""
    if output.is_dir():
        files = sorted(output.glob("*.safetensors"))
    else:
        stem = output.name[: -len(".safetensors")]
        files = sorted({*output.parent.glob(f"{stem}-*-of-*.safetensors"), *([output] if output.is_file() else [])})
    keys = []
    for file in files:
        with safe_open(str(file), "pt") as f:
            keys += list(f.keys())
    return keys


def assert_same_model(got: Path, want: Path) -> None:
    """Same keys, each stored once, same tensors (bitwise where computed key by key), the same
    metadata in every file."""
    a, b = opened(got), opened(want)
    assert sorted(a.keys()) == sorted(b.keys()) == sorted(stored_keys(got))  # every key written exactly once
    for key in b.keys():
        x, y = a.load(key), b.load(key)
        assert x.dtype == y.dtype and x.shape == y.shape, key
        if is_merged_as_matrix(key, y.shape, EXCLUDE):
            assert_same_result(key, x, y)
        else:
            assert torch.equal(x, y), key
    if want.is_dir():  # configs and tokenizer files copied from a base folder: the same bytes
        extras = lambda folder: {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix != ".safetensors"  # noqa: E731
                                 and not p.name.endswith(io.outputs.INDEX_SUFFIX)}
        assert extras(got) == extras(want)
    want_meta = safetensors_metadata(files_of(want)[0])
    assert want_meta and all(safetensors_metadata(f) == want_meta for f in files_of(got))
    if index_metadata(want) is not None:
        assert index_metadata(got) == index_metadata(want)


# ------------------------------------------------------------------------------------------------
# torchrun and ranks
# ------------------------------------------------------------------------------------------------
def test_torchrun_merge_equals_one_process(tiny, tmp_path):
    pre, fts = tiny
    common = ["merge", "-b", pre, *fts, "--max-shard-size", "100KB", "--no-progress"]
    ok(launch([*common, "-o", tmp_path / "one"], tmp_path, world=1))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "tsv_fast", *map(str, common), "-o", str(tmp_path / "two"),
                             "--report", str(tmp_path / "report.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 ranks" in result.stdout and "ranks: 0:" in result.stdout
    assert_same_model(tmp_path / "two", tmp_path / "one")
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and all(r["peak_rss_bytes"] > 0 for r in report["ranks"])
    assert sum(r["keys"] for r in report["ranks"]) == len(io.open_checkpoint(pre).keys())
    assert len(report["layers"]) == sum(1 for k in io.open_checkpoint(pre).keys()
                                        if is_merged_as_matrix(k, io.open_checkpoint(pre).shape(k), EXCLUDE))


@pytest.mark.parametrize("method", ["iso-c", "iso-cts", "ta"])
def test_every_merge_method_on_two_ranks_equals_one_process(tiny, tmp_path, method):
    pre, fts = tiny
    common = ["merge", "-b", pre, *fts, "--method", method, "--no-progress"]
    ok(launch([*common, "-o", tmp_path / "one.safetensors"], tmp_path, world=1))
    ok(launch([*common, "-o", tmp_path / "two.safetensors"], tmp_path))
    assert_same_model(tmp_path / "two.safetensors", tmp_path / "one.safetensors")
    assert leftovers(tmp_path) == []


def test_lora_merge_on_two_ranks_equals_one_process(tmp_path):
    base = make_base(torch.float32)
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, (config, tensors, _) in enumerate(make_adapters(base)):
        save_adapter(tmp_path / f"lora{i}", config, tensors)
        paths.append(tmp_path / f"lora{i}")
    common = ["merge", "-b", tmp_path / "base.safetensors", *paths, "--no-progress"]
    ok(launch([*common, "-o", tmp_path / "one"], tmp_path, world=1))
    ok(launch([*common, "-o", tmp_path / "two"], tmp_path))
    assert_same_model(tmp_path / "two", tmp_path / "one")


def test_compress_and_interference_on_two_ranks_equal_one_process(tiny, tmp_path):
    pre, fts = tiny
    for name, world in (("one", 1), ("two", 2)):
        ok(launch(["compress", "-b", pre, *fts, "-o", tmp_path / f"{name}.tsvc.safetensors"], tmp_path, world))
        ok(launch(["interference", "-b", pre, *fts, "-o", tmp_path / f"{name}.json"], tmp_path, world))
    one, two = (load_compressed(tmp_path / f"{n}.tsvc.safetensors") for n in ("one", "two"))
    assert read_compressed_header(tmp_path / "two.tsvc.safetensors") == read_compressed_header(tmp_path / "one.tsvc.safetensors")
    assert one.factors.keys() == two.factors.keys() and one.others.keys() == two.others.keys()
    for task in range(3):
        want = one.task_vector(task)
        for key, value in two.task_vector(task).items():
            assert_same_result(f"task {task} {key}", value, want[key])
    sti_one, sti_two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert list(sti_two["per_layer"]) == list(sti_one["per_layer"]) and sti_one["per_layer"]
    for key, value in sti_one["per_layer"].items():
        assert sti_two["per_layer"][key] == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert sti_two["per_block"] == pytest.approx(sti_one["per_block"], rel=1e-9)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_rank_stops_every_rank_and_leaves_no_output(tiny, tmp_path, failing):
    pre, fts = tiny
    checkpoints = [io.open_checkpoint(p) for p in (pre, *fts)]
    source, options = DenseTasks(checkpoints[0], checkpoints[1:]), Options()
    part = Part(failing, 2)
    part.select(make_plan(source, get_method("tsv-m"), options), source, None, options)
    key = next(k for k in part.order if part.assignment[k] == failing and len(checkpoints[0].shape(k)) == 2)
    bad = {k: checkpoints[2].load(k) for k in checkpoints[2].keys()}
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "ft1-bad.safetensors"))
    ranks = launch(["merge", "-b", pre, fts[0], tmp_path / "ft1-bad.safetensors", fts[2], "-o", tmp_path / "out",
                    "--no-progress"], tmp_path)
    assert [r.code for r in ranks] == [1, 1], "\n".join(r.log for r in ranks)
    assert key in ranks[failing].log and "NaN" in ranks[failing].log
    other = ranks[1 - failing].log
    assert f"rank {failing} of 2 failed" in other and "no output was written" in other and "Traceback" not in other
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# --shard I/N parts and finalize
# ------------------------------------------------------------------------------------------------
def test_configs_of_a_base_folder_are_copied_by_ranks_and_parts(tiny, tmp_path):
    """A base model folder's config.json (its dtype set) and tokenizer files reach the output once, from
    rank 0 at the commit, or from part 0 at finalize."""
    pre, fts = tiny
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(pre.read_bytes())
    (base / "config.json").write_text(json.dumps({"model_type": "clip", "torch_dtype": "float16"}))
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    common = ["merge", "-b", base, *fts, "--no-progress"]
    ok(launch([*common, "-o", tmp_path / "one"], tmp_path, world=1))
    assert json.loads((tmp_path / "one" / "config.json").read_text())["torch_dtype"] == "float32"
    ok(launch([*common, "-o", tmp_path / "two"], tmp_path))
    assert_same_model(tmp_path / "two", tmp_path / "one")
    for i in range(2):
        ok(launch([*common, "-o", tmp_path / "parts", "--shard", f"{i}/2"], tmp_path, world=1))
    (base / "tokenizer.json").write_text('{"version": "2.0"}')  # part 0 copied it when it ran
    ok(launch(["finalize", tmp_path / "parts"], tmp_path, world=1))
    assert_same_model(tmp_path / "parts", tmp_path / "one")


def test_shard_parts_finalize_into_the_one_process_output(tiny, tmp_path):
    pre, fts = tiny
    common = ["merge", "-b", pre, *fts, "--no-progress", "--max-shard-size", "100KB"]
    ok(launch([*common, "-o", tmp_path / "one"], tmp_path, world=1))
    out = tmp_path / "out"
    ok(launch([*common, "-o", out, "--shard", "0/3"], tmp_path, world=1))
    refused = launch(["finalize", out], tmp_path, world=1)[0]
    assert refused.code == 1 and "2 of 3 parts" in refused.log and "part 1, 2" in refused.log
    assert not out.exists() and (tmp_path / "out.parts" / "part-00000-of-00003").is_dir()

    ok(launch([*common, "-o", out, "--shard", "1/3", "--alpha", "0.5"], tmp_path, world=1))  # another plan
    ok(launch([*common, "-o", out, "--shard", "2/3"], tmp_path, world=1))
    refused = launch(["finalize", out], tmp_path, world=1)[0]
    assert refused.code == 1 and "different plans" in refused.log and "alpha: 1.0 vs 0.5" in refused.log, refused.log
    assert not out.exists()

    ok(launch([*common, "-o", out, "--shard", "1/3"], tmp_path, world=1))  # a rerun replaces the part
    ok(launch(["finalize", out], tmp_path, world=1))
    assert_same_model(out, tmp_path / "one")
    assert not (tmp_path / "out.parts").exists() and leftovers(tmp_path) == []


def test_a_part_of_other_inputs_is_refused(tiny, tmp_path):
    pre, fts = tiny
    changed = tmp_path / "ft2.safetensors"
    changed.write_bytes(fts[2].read_bytes())  # same tensors, another file
    out = tmp_path / "out.safetensors"
    ok(launch(["merge", "-b", pre, *fts, "-o", out, "--shard", "0/2", "--no-progress"], tmp_path, world=1))
    ok(launch(["merge", "-b", pre, fts[0], fts[1], changed, "-o", out, "--shard", "1/2", "--no-progress"], tmp_path,
              world=1))
    refused = launch(["finalize", out], tmp_path, world=1)[0]
    assert refused.code == 1 and "different plans" in refused.log and "ft2.safetensors" in refused.log, refused.log
    assert not out.exists()
    nothing = launch(["finalize", tmp_path / "elsewhere"], tmp_path, world=1)[0]
    assert nothing.code == 1 and "no parts to finalize" in nothing.log
