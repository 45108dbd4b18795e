"""The tsv-fast command line end to end, through subprocesses, on the tiny-vit layout."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tsv_fast
from tsv_fast import io, synthetic
from tsv_fast import compress, tsv_merge
from tsv_fast.testing import assert_same_result

from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsv_fast", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def same(got: dict, want: dict) -> bool:
    """Equal up to thread-count rounding (the CLI runs in another process)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert_same_result(key, got[key], value)
    return True


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    pre, fts, paths = save_tiny(folder, 3)
    return pre, fts, folder, paths


def test_help_lists_every_command():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("merge", "compress", "reconstruct", "interference", "convert", "demo"):
        assert command in result.stdout
    merge_help = cli("merge", "--help")
    assert merge_help.returncode == 0 and "--base" in merge_help.stdout and "--config" in merge_help.stdout


def test_merge_from_flags_sharded_with_report(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    result = cli("merge", "--base", folder / "pre.safetensors", *paths, "-o", tmp_path / "out",
                 "--max-shard-size", "100KB", "--report", tmp_path / "report.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "peak memory" in result.stdout and "done in" in result.stdout
    merged = io.open_checkpoint(tmp_path / "out")
    expected = tsv_merge(pre, fts)
    assert same({k: merged.load(k) for k in merged.keys()}, expected)
    assert (tmp_path / "out" / io.INDEX_NAME).exists()
    report = json.loads((tmp_path / "report.json").read_text())
    layer = next(iter(report["layers"].values()))
    assert report["num_tasks"] == 3 and layer["k"] >= 1 and layer["sti"] >= 0


def test_merge_from_yaml_config_with_out_dtype(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"base_model: {folder / 'pre.safetensors'}\n"
        f"models:\n  - model: {paths[0]}\n  - {paths[1]}\n  - model: {paths[2]}\n"
        "parameters:\n  alpha: 0.5\n  rank_fraction: 0.25\n"
        "exclude: [text_projection, visual.proj]\nout_dtype: bfloat16\noutput: merged.safetensors\n")
    result = cli("merge", "-c", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    out = load_file(str(tmp_path / "merged.safetensors"))  # relative to the config file
    expected = tsv_merge(pre, fts, alpha=0.5, rank_fraction=0.25, exclude=("text_projection", "visual.proj"))
    assert all(out[k].dtype == torch.bfloat16 for k in out) and same(out, {k: v.bfloat16() for k, v in expected.items()})


def test_merge_and_compress_exact(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    result = cli("merge", "--base", folder / "pre.safetensors", *paths, "-o", tmp_path / "exact.safetensors",
                 "--exact", "--report", tmp_path / "report.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    out = load_file(str(tmp_path / "exact.safetensors"))
    assert same(out, tsv_merge(pre, fts, exact=True))
    assert json.loads((tmp_path / "report.json").read_text())["backend"] == "exact"
    result = cli("compress", "--base", folder / "pre.safetensors", *paths, "-o", tmp_path / "t.tsvc.safetensors",
                 "--exact")
    assert result.returncode == 0, result.stderr
    packed = io.load_compressed(tmp_path / "t.tsvc.safetensors")
    want = compress(pre, fts, exact=True)
    assert same({k: f[1] for k, f in packed.factors.items()}, {k: f[1] for k, f in want.factors.items()})


def test_merge_errors_are_one_line(tiny, tmp_path):
    _, _, folder, paths = tiny
    missing = cli("merge", "--base", folder / "pre.safetensors", tmp_path / "nope.safetensors", "-o", tmp_path / "o.safetensors")
    assert missing.returncode == 1 and "nope.safetensors" in missing.stderr and "Traceback" not in missing.stderr
    same = cli("merge", "--base", folder / "pre.safetensors", *paths, "-o", paths[0])
    assert same.returncode == 1 and "overwrite input" in same.stderr
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("base_model: x\nmodelz: []\n")
    result = cli("merge", "-c", bad_config)
    assert result.returncode == 1 and "modelz" in result.stderr


def test_merge_methods_from_flags_and_config(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    result = cli("merge", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "iso.safetensors",
                 "--method", "iso-cts", "--common-space-fraction", "0.6", "--alpha", "1.5", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert same(load_file(str(tmp_path / "iso.safetensors")),
                tsv_fast.merge(pre, fts, method="iso-cts", common_space_fraction=0.6, alpha=1.5))
    config = tmp_path / "iso.yaml"
    config.write_text(f"base_model: {folder / 'pre.safetensors'}\nmodels:\n"
                      + "".join(f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in zip(paths, (1, 2, 0.5)))
                      + "merge_method: iso_c\nparameters: {alpha: 0.5}\noutput: isoc.safetensors\n")
    result = cli("merge", "-c", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    want = tsv_fast.merge(pre, fts, method="iso-c", alpha=0.5, weights=[1, 2, 0.5])
    assert same(load_file(str(tmp_path / "isoc.safetensors")), want)


@pytest.mark.parametrize("line, words", [
    ("exact: 'no'", ["exact", "true or false", "'no'"]),
    ("allow_pickle: 'false'", ["allow_pickle", "true or false"]),
    ("parameters: {alpah: 1.0}", ["parameters.alpah", "allowed there: alpha"]),
    ("alpha: .nan", ["alpha", "a number"]),
    ("out_dtype: int8", ["out_dtype", "float32, float16, bfloat16, float64"]),
    ("merge_method: ties", ["merge_method", "tsv-m, iso-c, iso-cts, ta"]),
    ("models: [{path: a.safetensors}]", ["models[0]", "'model' key"]),
    ("models: [{model: a.safetensors, parameters: {density: 0.5}}]", ["models[0].parameters", "density", "weight"]),
    ("base_model: [unclosed", ["not valid YAML", "line 3"]),
    ("missing_keys: maybe", ["missing_keys", "base, zero, error"]),
    ("copy_configs: 'no'", ["copy_configs", "true or false"]),
    ("dtype: float16", ["dtype", "float32, float64"]),
])
def test_config_keys_are_typed(tmp_path, line, words):
    """Every key is known and typed: a quoted 'false' never turns unpickling on, a typo inside
    `parameters:` is not ignored; each failure is one line naming the key and what is allowed."""
    config = tmp_path / "c.yaml"
    config.write_text(("base_model: pre.safetensors\nmodels: [a.safetensors]\noutput: o.safetensors\n"
                       if not line.startswith(("base_model", "models")) else "output: o.safetensors\n") + line + "\n")
    result = cli("merge", "-c", config)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_compress_then_reconstruct(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    result = cli("compress", "--base", folder / "pre.safetensors", *paths, "-o", tmp_path / "tasks.tsvc")
    assert result.returncode == 0, result.stderr
    assert "instead of" in result.stdout
    result = cli("reconstruct", tmp_path / "tasks.tsvc", "--task", 1, "--base", folder / "pre.safetensors",
                 "-o", tmp_path / "task1.safetensors")
    assert result.returncode == 0, result.stderr
    rebuilt = load_file(str(tmp_path / "task1.safetensors"))
    expected = compress(pre, fts).reconstruct(1, pre)
    assert all(torch.allclose(rebuilt[k], v, atol=1e-6) for k, v in expected.items())
    # the rebuilt model is close to the real fine-tune where its rank-k factors capture Δ
    assert all(torch.allclose(rebuilt[k], fts[1][k], atol=1e-6) for k in fts[1] if rebuilt[k].ndim != 2)


def test_interference_json_csv_and_plots(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    result = cli("interference", "--base", folder / "pre.safetensors", *paths, "-o", tmp_path / "sti.json",
                 "--plot", tmp_path / "sti.png", "--heatmap", tmp_path / "heat.png",
                 "--layer", "visual.transformer.resblocks.1.mlp.c_fc.weight")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "sti.json").read_text())
    from tsv_fast import interference

    expected = interference(pre, fts)
    assert data["per_layer"].keys() == expected.keys()
    assert all(abs(data["per_layer"][k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in expected.items())
    blocks = torch.tensor(data["block_similarity"]["blocks"])
    assert blocks.shape == (3, 3) and torch.allclose(blocks.diagonal(), torch.ones(3), atol=1e-6)
    for png in ("sti.png", "heat.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    result = cli("interference", "--base", folder / "pre.safetensors", *paths, "-o", tmp_path / "sti.csv")
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "sti.csv").read_text().splitlines()
    assert lines[0] == "layer,sti" and len(lines) == len(expected) + 1


def test_convert_needs_the_opt_in_for_pickles(tmp_path):
    module = torch.nn.Linear(4, 3)
    torch.save(module, tmp_path / "model.pt")
    refused = cli("convert", tmp_path / "model.pt", tmp_path / "model.safetensors")
    assert refused.returncode == 1 and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "model.safetensors").exists()
    result = cli("convert", tmp_path / "model.pt", tmp_path / "model.safetensors", "--allow-pickle")
    assert result.returncode == 0, result.stderr
    out = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(out[k], v) for k, v in module.state_dict().items())


def test_demo_tiny(tmp_path):
    result = cli("demo", "--layout", "tiny-vit", "--tasks", 3, "--dir", tmp_path / "inputs",
                 "--output", tmp_path / "merged.safetensors", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "STI" in result.stdout and f"merged file: {tmp_path / 'merged.safetensors'}" in result.stdout
    # the checkpoints it wrote one at a time are synthetic.checkpoints', and so is the merge
    pre, fts = synthetic.checkpoints("tiny-vit", 3)
    written = [load_file(str(tmp_path / "inputs" / name)) for name in
               ["pretrained.safetensors", *(f"finetuned_{i}.safetensors" for i in range(3))]]
    assert all(torch.equal(w[k], sd[k]) for w, sd in zip(written, [pre, *fts]) for k in sd)
    merged = load_file(str(tmp_path / "merged.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = tsv_merge(pre, fts)
    assert same(merged, expected)
    # the peak beside the inputs, and the TSV-C share that `compress` really stores for these tasks
    assert "4 checkpoints of" in result.stdout and "of the inputs)" in result.stdout
    ratio = compress(pre, fts).storage()["ratio"]
    assert f"TSV-C of these tasks (tsv-fast compress) stores {ratio:.1%} of the dense task vectors" in result.stdout


def test_python_dash_m_and_version():
    result = cli("version")
    assert result.returncode == 0 and "tsv_fast" in result.stdout and "torch" in result.stdout


def test_sigterm_during_merge_leaves_no_files(tiny, tmp_path):
    import signal
    import time

    _, _, folder, paths = tiny
    # A slow merge: float64 compute and many tasks' worth of repeated inputs.
    proc = subprocess.Popen([sys.executable, "-m", "tsv_fast", "merge", "--base", str(folder / "pre.safetensors"),
                             *map(str, paths * 30), "-o", str(tmp_path / "out.safetensors"), "--dtype", "float64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.iterdir()):  # wait until it is writing
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the merge finished before the signal arrived")
    assert proc.returncode == 130 and "no output was written" in err
    assert list(tmp_path.iterdir()) == []
