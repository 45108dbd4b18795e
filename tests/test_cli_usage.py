"""The command line as the README and its own messages describe it: every option they name exists
(`--min-rank`, `--rank-override`, `--no-progress` everywhere), errors are one line and come before
torch loads, an absent device is one line, warnings are one line, `version` prints cleanly."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import cli, same, tiny  # noqa: F401 - tiny is a fixture

import tsv_fast
from tsv_fast import reference
from tsv_fast.io import load_compressed, read_compressed_header
from tsv_fast.testing import assert_rel_close

RANKS = ["--rank-fraction", "0.01", "--min-rank", "1", "--rank-override", "*.attn.out_proj.weight=3"]
RANK_OPTIONS = {"rank_fraction": 0.01, "min_rank": 1, "rank_overrides": {"*.attn.out_proj.weight": 3}}


def test_compress_and_interference_take_the_rank_options_and_no_progress(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    result = cli("compress", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "t.tsvc", *RANKS,
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "layers/s" not in result.stderr  # no progress bar
    keys = read_compressed_header(tmp_path / "t.tsvc")["keys"]
    assert keys["visual.positional_embedding"]["k"] == 1  # int(17 * 0.01) = 0, raised to --min-rank
    assert keys["visual.transformer.resblocks.0.attn.out_proj.weight"]["k"] == 3  # the override
    packed, want = load_compressed(tmp_path / "t.tsvc"), tsv_fast.compress(pre, fts, **RANK_OPTIONS)
    assert same({k: f[1] for k, f in packed.factors.items()}, {k: f[1] for k, f in want.factors.items()})
    result = cli("interference", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "sti.json", *RANKS,
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "layers/s" not in result.stderr
    got = json.loads((tmp_path / "sti.json").read_text())["per_layer"]
    expected = tsv_fast.interference(pre, fts, **RANK_OPTIONS)
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in expected.items())
    shown = cli("compress", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "u.tsvc")
    assert shown.returncode == 0 and "layers" in shown.stderr  # the bar --no-progress turns off


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_before_any_work(tiny, tmp_path):
    _, _, folder, paths = tiny
    config = tmp_path / "m.yaml"
    config.write_text(f"base_model: {folder / 'pre.safetensors'}\nmodels: [{paths[0]}, {paths[1]}]\n"
                      f"device: cuda\noutput: {tmp_path / 'out' / 'y.safetensors'}\n")
    runs = [("merge", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "out" / "m", "--device", "cuda"),
            ("merge", "-c", config),
            ("compress", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "out" / "t.tsvc", "--device", "cuda"),
            ("interference", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "out" / "s.json",
             "--device", "cuda:0")]
    for args in runs:
        result = cli(*args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "CUDA is not available" in result.stderr and "use cpu" in result.stderr
        assert not (tmp_path / "out").exists()


def test_exact_float64_writes_float64_unless_told(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    result = cli("merge", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "oracle.safetensors",
                 "--exact", "--dtype", "float64", "--no-progress")
    assert result.returncode == 0, result.stderr
    got = load_file(str(tmp_path / "oracle.safetensors"))
    double = lambda sd: {k: v.double() for k, v in sd.items()}  # noqa: E731
    want = reference.tsv_merge(double(pre), [double(ft) for ft in fts], compute_dtype=torch.float64)
    for key, value in want.items():
        assert got[key].dtype == torch.float64, key
        assert_rel_close(key, got[key], value, 1e-12)  # a float32 rounding on the way would be ~1e-8
    result = cli("merge", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "f32.safetensors",
                 "--exact", "--dtype", "float64", "--out-dtype", "float32", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert all(v.dtype == torch.float32 for v in load_file(str(tmp_path / "f32.safetensors")).values())


def test_warnings_are_one_line_and_name_the_option_to_pass(tiny, tmp_path):
    _, _, folder, paths = tiny
    result = cli("merge", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "m.safetensors",
                 "--rank-fraction", "0.01", "--no-progress")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "k = 0" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "--min-rank 1" in warned[0], result.stderr
    assert ".py:" not in result.stderr and "warnings.warn" not in result.stderr
    result = cli("merge", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "m.safetensors",
                 "--rank-fraction", "0.01", "--min-rank", "1", "--no-progress")
    assert result.returncode == 0 and "k = 0" not in result.stderr, result.stderr


def test_argument_and_path_errors_come_before_torch_loads(tmp_path):
    """Each of these fails in one line without importing torch (so it answers as fast as --help)."""
    (tmp_path / "pre.safetensors").write_bytes(b"")
    bad_config = tmp_path / "c.yaml"
    bad_config.write_text("base_model: pre.safetensors\nmodels: [a.safetensors]\ndtype: float16\noutput: o\n")
    cases = [["merge", "-b", "nope", "x", "-o", "y"],
             ["merge", "-b", str(tmp_path / "pre.safetensors"), "missing.safetensors", "-o", "y"],
             ["merge", "-b", str(tmp_path / "pre.safetensors"), "x", "-o", "y", "--dtype", "float16"],
             ["merge", "-b", str(tmp_path / "pre.safetensors"), "x", "-o", "y", "--method", "ties"],
             ["merge", "-c", str(bad_config)],
             ["merge", "-c", str(tmp_path / "missing.yaml")],
             ["merge", "-b", str(tmp_path / "pre.safetensors"), str(tmp_path / "pre.safetensors"), "-o",
              str(tmp_path / "pre.safetensors")],
             ["compress", "-b", "nope", "x", "-o", "y.tsvc"],
             ["interference", "-b", "nope", "x"],
             ["reconstruct", "nope.tsvc", "--task", "0", "-o", "y"]]
    code = ("import io, json, sys, contextlib\n"
            "from tsv_fast.cli import app\n"
            "out = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        try:\n"
            "            app(argv, prog_name='tsv-fast')\n"
            "        except SystemExit as exc:\n"
            "            code = exc.code\n"
            "    out.append([code, err.getvalue(), 'torch' in sys.modules])\n"
            "print(json.dumps(out))\n")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for argv, (code, err, torch_loaded) in zip(cases, json.loads(result.stdout)):
        assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (argv, err)
        assert not torch_loaded, (argv, err)


def test_version_names_each_backend_once():
    result = cli("version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("tsv_fast ") and "torch" in lines[0]
    from tsv_fast.backends import REGISTRY

    assert len(lines) == 1 + len(REGISTRY)
    for name, line in zip(REGISTRY, lines[1:]):
        assert line.split()[0] == name and f"{name}: " not in line, line


def test_config_names_match_the_options():
    """The command line checks names without torch; they must be the names the options read."""
    from tsv_fast.cli import config
    from tsv_fast.options import MISSING_KEYS, parse_dtype

    for spelling, name in config.DTYPE_NAMES.items():
        assert parse_dtype(spelling) == getattr(torch, name), spelling
    assert config.MISSING_KEYS == MISSING_KEYS


def test_a_refused_merge_leaves_no_folder_and_missing_keys_zero_merges(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    lacking = dict(fts[1])
    del lacking["visual.ln_post.bias"]
    save_file(lacking, str(tmp_path / "lacking.safetensors"))
    inputs = [paths[0], tmp_path / "lacking.safetensors", paths[2]]
    target = tmp_path / "new" / "deeper" / "merged"
    result = cli("merge", "-b", folder / "pre.safetensors", *inputs, "-o", target, "--no-progress")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "missing keys ['visual.ln_post.bias']" in result.stderr and "--missing-keys zero" in result.stderr
    assert not (tmp_path / "new").exists()
    config = tmp_path / "m.yaml"
    config.write_text(f"base_model: {folder / 'pre.safetensors'}\nmodels: [{', '.join(map(str, inputs))}]\n"
                      f"missing_keys: zero\noutput: {target}\n")
    result = cli("merge", "-c", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    filled = [fts[0], {**lacking, "visual.ln_post.bias": pre["visual.ln_post.bias"]}, fts[2]]
    assert same(load_file(str(target / "model.safetensors")), tsv_fast.tsv_merge(pre, filled))


def test_interference_names_tasks_and_keeps_the_matrix_out_of_the_json(tiny, tmp_path):
    pre, fts, folder, paths = tiny
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    result = cli("interference", "-b", folder / "pre.safetensors", *paths, "-o", tmp_path / "sti.json",
                 "--heatmap", tmp_path / "heat.png", "--layer", key, "--no-progress")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "sti.json").read_text())
    assert data["tasks"] == ["ft0", "ft1", "ft2"]
    similarity = data["block_similarity"]
    assert similarity["gram_abs"] == "sti.gram_abs.npy" and similarity["layer"] == key
    gram = np.load(tmp_path / "sti.gram_abs.npy")
    k = similarity["k"]
    assert gram.shape == (3 * k, 3 * k) and gram.dtype == np.float32
    assert np.allclose(np.diag(gram), 1, atol=1e-5) and float(gram.max()) <= 1 + 1e-5
    blocks = np.asarray(similarity["blocks"])  # ‖U_iᵀU_j‖_F / √k from the same Gram
    for i in range(3):
        for j in range(3):
            tile = gram[i * k:(i + 1) * k, j * k:(j + 1) * k]
            assert abs(np.linalg.norm(tile) / np.sqrt(k) - blocks[i, j]) < 1e-4
    assert (tmp_path / "sti.json").stat().st_size < 20_000


def test_plot_labels_group_layers_by_block():
    from tsv_fast.cli.sti import block_labels, layer_groups, task_names

    keys = ["visual.positional_embedding", "visual.transformer.resblocks.0.attn.in_proj_weight",
            "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.11.mlp.c_proj.weight",
            "model.layers.3.self_attn.q_proj.weight"]
    assert layer_groups(keys) == [("visual", "visual.positional_embedding"),
                                  ("visual.transformer.resblocks.0", "attn.in_proj_weight"),
                                  ("visual.transformer.resblocks.0", "mlp.c_fc"),
                                  ("visual.transformer.resblocks.11", "mlp.c_proj"),
                                  ("model.layers.3", "self_attn.q_proj")]
    assert block_labels(["visual.transformer.resblocks.0", "visual.transformer.resblocks.1", "visual.proj"]) == \
        (["0", "1", "visual.proj"], "block (visual.transformer.resblocks.N)")
    assert block_labels(["transformer.resblocks.0", "visual.transformer.resblocks.0"])[0] == \
        ["transformer.resblocks.0", "visual.transformer.resblocks.0"]
    assert task_names(["a/ft_mnist.safetensors", "b/cars/model.safetensors", "org/svhn@v2", "x/ft_mnist.pt"]) == \
        ["ft_mnist (0)", "cars", "svhn", "ft_mnist (3)"]
