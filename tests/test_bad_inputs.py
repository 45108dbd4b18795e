"""Every failure a user can cause, walked through every command: exit status 1, one line naming what is
wrong (file, key, shape or option), no traceback, the inputs byte-identical and no output left behind.

Run in-process with typer's CliRunner (the subprocess route is covered by test_cli.py), so that the
walk stays fast."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import tsv_fast
from tsv_fast import io, synthetic
from tsv_fast.cli import app


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    pre, fts = synthetic.checkpoints("tiny-vit", 2)
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    save_file(pre, str(root / "pre.safetensors"))
    for i, ft in enumerate(fts):
        save_file(ft, str(root / f"ft{i}.safetensors"))
    good = (root / "ft0.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    save_file({k: v for k, v in fts[0].items() if k != key}, str(root / "missing_key.safetensors"))
    save_file({**fts[0], key: torch.zeros(3, 3)}, str(root / "wrong_shape.safetensors"))
    save_file({**fts[0], key: fts[0][key].clone().fill_(float("nan"))}, str(root / "nan.safetensors"))
    torch.save({"w": torch.ones(2), "evil": Evil()}, root / "evil.pt")
    io.save_compressed(root / "tasks.tsvc", tsv_fast.compress(pre, fts))
    raw = (root / "tasks.tsvc").read_bytes()
    (root / "damaged.tsvc").write_bytes(raw[: len(raw) // 3])
    save_file({k: v for k, v in pre.items() if k != key}, str(root / "base_missing.safetensors"))
    save_file({**pre, key: pre[key][:1].clone()}, str(root / "base_broadcast.safetensors"))
    # LoRA adapters of a tiny base
    save_file({"layer.weight": torch.randn(8, 6), "layer.bias": torch.zeros(8)}, str(root / "lora_base.safetensors"))

    def adapter(name, config, tensors):
        folder = root / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    lora = {"base_model.model.layer.lora_A.weight": torch.randn(2, 6), "base_model.model.layer.lora_B.weight": torch.randn(8, 2)}
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    adapter("adapter_ok", cfg, lora)
    adapter("adapter_list_config", "[1, 2, 3]", lora)
    adapter("adapter_bad_regex", {**cfg, "alpha_pattern": {"lay(er": 3}}, lora)
    adapter("adapter_rank0", {**cfg, "r": 0}, {"base_model.model.layer.lora_A.weight": torch.zeros(0, 6),
                                                "base_model.model.layer.lora_B.weight": torch.zeros(8, 0)})
    adapter("adapter_nan", cfg, {**lora, "base_model.model.layer.bias": torch.full((8,), float("nan"))})
    return root


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = {
    # merge
    "missing file": (["merge", "-b", "{r}/pre.safetensors", "{r}/nope.safetensors", "-o", "{o}"], ["nope.safetensors", "not found"]),
    "truncated": (["merge", "-b", "{r}/pre.safetensors", "{r}/truncated.safetensors", "-o", "{o}"], ["truncated.safetensors"]),
    "garbage": (["merge", "-b", "{r}/pre.safetensors", "{r}/garbage.safetensors", "-o", "{o}"], ["garbage.safetensors", "not a safetensors file"]),
    "missing key": (["merge", "-b", "{r}/pre.safetensors", "{r}/missing_key.safetensors", "-o", "{o}"], ["missing keys", "in_proj_weight", "missing_key.safetensors"]),
    "wrong shape": (["merge", "-b", "{r}/pre.safetensors", "{r}/wrong_shape.safetensors", "-o", "{o}"], ["in_proj_weight", "(3, 3)"]),
    "nan input": (["merge", "-b", "{r}/pre.safetensors", "{r}/nan.safetensors", "{r}/ft1.safetensors", "-o", "{o}"], ["NaN", "nan.safetensors", "in_proj_weight"]),
    "pickle": (["merge", "-b", "{r}/pre.safetensors", "{r}/evil.pt", "-o", "{o}"], ["evil.pt", "pickled"]),
    "int out dtype": (["merge", "-b", "{r}/pre.safetensors", "{r}/ft0.safetensors", "-o", "{o}", "--out-dtype", "int8"], ["--out-dtype", "float32"]),
    "nan alpha": (["merge", "-b", "{r}/pre.safetensors", "{r}/ft0.safetensors", "-o", "{o}", "--alpha", "nan"], ["--alpha", "a number"]),
    "unknown method": (["merge", "-b", "{r}/pre.safetensors", "{r}/ft0.safetensors", "-o", "{o}", "--method", "ties"], ["--merge-method", "iso-cts"]),
    "cuda without cuda": (["merge", "-b", "{r}/pre.safetensors", "{r}/ft0.safetensors", "-o", "{o}", "--device", "cuda"], ["cuda", "not available"]),
    "bad rank override": (["merge", "-b", "{r}/pre.safetensors", "{r}/ft0.safetensors", "-o", "{o}", "--rank-override", "x=y"], ["--rank-override", "PATTERN=K"]),
    "adapter config list": (["merge", "-b", "{r}/lora_base.safetensors", "{r}/adapter_list_config", "-o", "{o}"], ["adapter_config.json", "mapping"]),
    "adapter bad regex": (["merge", "-b", "{r}/lora_base.safetensors", "{r}/adapter_bad_regex", "-o", "{o}"], ["alpha_pattern", "lay(er"]),
    "adapter rank 0": (["merge", "-b", "{r}/lora_base.safetensors", "{r}/adapter_rank0", "-o", "{o}"], ["adapter_rank0", "rank 0"]),
    "adapter nan": (["merge", "-b", "{r}/lora_base.safetensors", "{r}/adapter_nan", "{r}/adapter_ok", "-o", "{o}"], ["adapter_nan", "NaN", "layer.bias"]),
    # reconstruct
    "damaged tsvc": (["reconstruct", "{r}/damaged.tsvc", "-t", "0", "-o", "{o}"], ["damaged.tsvc"]),
    "task out of range": (["reconstruct", "{r}/tasks.tsvc", "-t", "5", "-o", "{o}"], ["task 5", "holds 2 tasks"]),
    "negative task": (["reconstruct", "{r}/tasks.tsvc", "-t", "-1", "-o", "{o}"], ["task -1", "holds 2 tasks"]),
    "base missing key": (["reconstruct", "{r}/tasks.tsvc", "-t", "0", "-b", "{r}/base_missing.safetensors", "-o", "{o}"], ["base_missing.safetensors", "in_proj_weight"]),
    "base broadcast shape": (["reconstruct", "{r}/tasks.tsvc", "-t", "0", "-b", "{r}/base_broadcast.safetensors", "-o", "{o}"], ["in_proj_weight", "(1, 64)", "(192, 64)"]),
    # compress / interference / convert
    "compress mismatch": (["compress", "-b", "{r}/pre.safetensors", "{r}/missing_key.safetensors", "-o", "{o}"], ["missing keys"]),
    "heatmap unknown layer": (["interference", "-b", "{r}/pre.safetensors", "{r}/ft0.safetensors", "{r}/ft1.safetensors", "-o", "{o}",
                               "--heatmap", "{o}.png", "--layer", "no.such.layer"], ["no.such.layer", "not found"]),
    "convert pickle": (["convert", "{r}/evil.pt", "{o}"], ["evil.pt", "pickled", "--allow-pickle"]),
}


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_line_and_changes_nothing(files, tmp_path, name):
    args, words = CASES[name]
    out = tmp_path / "out.safetensors"
    args = [a.format(r=files, o=out) for a in args]
    before = digest(files)
    result = CliRunner().invoke(app, args)
    stderr = result.stderr if hasattr(result, "stderr") else result.output
    assert result.exit_code == 1, (name, result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{name}: raised {result.exception!r}"
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr  # progress bars may come before
    for word in words:
        assert word in stderr, (name, word, stderr)
    assert digest(files) == before, f"{name}: an input changed"
    assert list(tmp_path.iterdir()) == [], f"{name}: left {list(tmp_path.iterdir())}"
    assert "pwned" not in result.output  # no pickled code ran
