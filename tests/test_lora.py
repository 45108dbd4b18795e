"""TSV-M of PEFT LoRA adapters (tsv_fast.lora_tsv_merge) against the float64 reference on dense task vectors.

The expected dense Δ of each adapter is written out here from PEFT's rules (scale α/r or α/√r,
alpha_pattern, fan_in_fan_out and embeddings transposed, conv adapters reshaped), independently
of tsv_fast.io.peft's parser.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsv_fast import lora_tsv_merge, reference
from tsv_fast.io import peft as lora
from tsv_fast.testing import assert_same_result
from tsv_fast.testing import assert_rel_close

from test_cli import cli

F64 = torch.float64
BASE_SHAPES = {
    "model.embed_tokens.weight": (50, 24),
    "model.layers.0.self_attn.q_proj.weight": (24, 24),
    "model.layers.0.self_attn.k_proj.weight": (24, 24),   # no adapter touches it
    "model.layers.0.self_attn.v_proj.weight": (16, 24),   # wide; k = 5 < r = 6: truncated
    "model.layers.0.mlp.up_proj.weight": (40, 24),
    "model.layers.0.mlp.c_attn.weight": (24, 36),         # a Conv1D-style [in, out] weight
    "model.layers.0.conv.weight": (8, 4, 3, 3),
    "model.norm.weight": (24,),
    "lm_head.weight": (50, 24),
}
P = "base_model.model."


def make_base(dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=F64).to(dtype) for k, s in BASE_SHAPES.items()}
    base["model.layers.0.position_ids"] = torch.arange(7)
    return base


def rand(*shape, g, scale=0.3):
    return scale * torch.randn(*shape, generator=g, dtype=F64)


def make_adapters(base):
    """Three adapters: (config, saved tensors, expected dense Δ per base key)."""
    g = torch.Generator().manual_seed(1)
    adapters = []
    # 0: r = 4, α = 8; q/up projections, an embedding, a conv; lm_head saved whole (modules_to_save)
    a = {"q": rand(4, 24, g=g), "up": rand(4, 24, g=g), "embA": rand(4, 50, g=g), "convA": rand(4, 4, 3, 3, g=g)}
    b = {"q": rand(24, 4, g=g), "up": rand(40, 4, g=g), "embB": rand(24, 4, g=g), "convB": rand(8, 4, 1, 1, g=g)}
    head = base["lm_head.weight"].to(F64) + rand(50, 24, g=g, scale=0.05)
    tensors = {P + "model.layers.0.self_attn.q_proj.lora_A.weight": a["q"],
               P + "model.layers.0.self_attn.q_proj.lora_B.weight": b["q"],
               P + "model.layers.0.mlp.up_proj.lora_A.weight": a["up"],
               P + "model.layers.0.mlp.up_proj.lora_B.weight": b["up"],
               P + "model.embed_tokens.lora_embedding_A": a["embA"],
               P + "model.embed_tokens.lora_embedding_B": b["embB"],
               P + "model.layers.0.conv.lora_A.weight": a["convA"],
               P + "model.layers.0.conv.lora_B.weight": b["convB"],
               P + "lm_head.weight": head}
    s = 8 / 4
    delta = {"model.layers.0.self_attn.q_proj.weight": s * b["q"] @ a["q"],
             "model.layers.0.mlp.up_proj.weight": s * b["up"] @ a["up"],
             "model.embed_tokens.weight": s * (b["embB"] @ a["embA"]).T,
             "model.layers.0.conv.weight": s * (b["convB"].flatten(1) @ a["convA"].flatten(1)).reshape(8, 4, 3, 3),
             "lm_head.weight": head - base["lm_head.weight"].to(F64)}
    adapters.append(({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, tensors, delta))
    # 1: r = 6, rsLoRA, alpha_pattern for v_proj; norm saved whole in the modules_to_save form
    a = {"q": rand(6, 24, g=g), "v": rand(6, 24, g=g)}
    b = {"q": rand(24, 6, g=g), "v": rand(16, 6, g=g)}
    norm = base["model.norm.weight"].to(F64) + rand(24, g=g, scale=0.1)
    tensors = {P + "model.layers.0.self_attn.q_proj.lora_A.weight": a["q"],
               P + "model.layers.0.self_attn.q_proj.lora_B.weight": b["q"],
               P + "model.layers.0.self_attn.v_proj.lora_A.weight": a["v"],
               P + "model.layers.0.self_attn.v_proj.lora_B.weight": b["v"],
               P + "model.norm.modules_to_save.default.weight": norm}
    delta = {"model.layers.0.self_attn.q_proj.weight": 16 / math.sqrt(6) * b["q"] @ a["q"],
             "model.layers.0.self_attn.v_proj.weight": 3 / math.sqrt(6) * b["v"] @ a["v"],
             "model.norm.weight": norm - base["model.norm.weight"].to(F64)}
    adapters.append(({"peft_type": "LORA", "r": 6, "lora_alpha": 16, "use_rslora": True,
                      "alpha_pattern": {"v_proj": 3}}, tensors, delta))
    # 2: GPT-2 style Conv1D layer (fan_in_fan_out): the weight is [in, out], Δ = (B A)ᵀ
    a, b = rand(3, 24, g=g), rand(36, 3, g=g)
    tensors = {P + "model.layers.0.mlp.c_attn.lora_A.weight": a, P + "model.layers.0.mlp.c_attn.lora_B.weight": b}
    delta = {"model.layers.0.mlp.c_attn.weight": 2.0 * (b @ a).T}
    adapters.append(({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "fan_in_fan_out": True}, tensors, delta))
    return adapters


def save_adapter(folder, config, tensors, fmt="safetensors", dtype=torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / lora.CONFIG_NAME).write_text(json.dumps(config))
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(tensors, folder / "adapter_model.bin")
    return folder


@pytest.fixture
def saved(tmp_path):
    base = make_base()
    adapters = make_adapters(base)
    paths = [save_adapter(tmp_path / f"adapter{i}", cfg, t, fmt="bin" if i == 1 else "safetensors", dtype=F64)
             for i, (cfg, t, _) in enumerate(adapters)]
    return base, adapters, paths


def dense_finetunes(base, adapters):
    return [{k: v.to(F64) + delta[k] if k in delta else v.to(F64) if v.is_floating_point() else v
             for k, v in base.items()} for _, _, delta in adapters]


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_lora_merge_equals_the_reference_on_dense_task_vectors(saved, alpha):
    base, adapters, paths = saved
    got, report = lora_tsv_merge(base, paths, alpha=alpha, compute_dtype=F64, return_report=True)
    fts = dense_finetunes(base, adapters)
    floats = {k: v for k, v in base.items() if v.is_floating_point()}
    want = reference.tsv_merge(floats, [{k: ft[k] for k in floats} for ft in fts], alpha=alpha, compute_dtype=F64)
    for key in want:
        assert got[key].dtype == base[key].dtype
        assert_rel_close(f"lora {key} alpha={alpha}", got[key] - base[key], want[key] - base[key], 1e-10)
    assert torch.equal(got["model.layers.0.position_ids"], base["model.layers.0.position_ids"])
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    assert got["model.layers.0.self_attn.k_proj.weight"] is not base["model.layers.0.self_attn.k_proj.weight"]
    # the LoRA stacks are Σ rᵢ wide (q: 4 + 6), not T·k: ranks and conditioning come from them
    q = report.layers["model.layers.0.self_attn.q_proj.weight"]
    assert q.k == 8 and q.rank_u == 10 and q.rank_v == 10 and q.sti >= 0
    assert report.layers["model.layers.0.self_attn.v_proj.weight"].rank_u == 5  # truncated to k = 5
    assert set(report.averaged) == {"model.layers.0.conv.weight", "model.norm.weight"}


@pytest.mark.parametrize("method", ["iso-c", "iso-cts", "ta"])
def test_other_methods_on_adapters_equal_their_twins_on_dense_task_vectors(saved, method):
    """Every merge method runs on adapters: Iso-CTS's residual factors come from the projected
    low-rank factors, Iso-C's sum is formed one layer at a time, Task Arithmetic sums the updates."""
    base, adapters, paths = saved
    got = lora_tsv_merge(base, paths, method=method, alpha=0.8, compute_dtype=F64)
    fts = dense_finetunes(base, adapters)
    floats = [k for k, v in base.items() if v.is_floating_point()]
    tvs = [{k: ft[k] - base[k].to(F64) for k in floats} for ft in fts]
    twin = {"iso-c": reference.iso_c, "iso-cts": reference.iso_cts,
            "ta": lambda tvs, **kw: {k: sum(tv[k] for tv in tvs) for k in tvs[0]}}[method]
    merged_tv = twin(tvs, compute_dtype=F64)
    for key in floats:
        assert_rel_close(f"{method} {key}", got[key] - base[key], 0.8 * merged_tv[key], 1e-10)


def test_lora_merge_in_float32_and_bfloat16(tmp_path):
    base64 = make_base()
    adapters = make_adapters(base64)
    paths = [save_adapter(tmp_path / f"a{i}", cfg, t) for i, (cfg, t, _) in enumerate(adapters)]
    want = reference.tsv_merge({k: v for k, v in base64.items() if v.is_floating_point()},
                               [{k: v for k, v in ft.items() if v.is_floating_point()}
                                for ft in dense_finetunes(base64, adapters)], compute_dtype=F64)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base64.items()}
        got = lora_tsv_merge(base, paths)
        for key in want:
            assert got[key].dtype == dtype
            # the adapters were saved in float32: their rounding, then the output cast, bound the error
            assert_rel_close(f"{dtype} {key}", got[key].double(), want[key], bound)


def test_factor_svd_is_exact_and_sign_independent():
    g = torch.Generator().manual_seed(4)
    for transposed, (m, r, n) in [(False, (30, 5, 20)), (True, (30, 5, 20)), (False, (7, 9, 11))]:
        factor = lora.LoraFactor(torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n, generator=g, dtype=F64),
                                 0.5, transposed)
        dense = factor.dense(F64)
        u, s, v = factor.svd(3)
        ur, sr, vr = reference.topk_svd_ref(dense, 3)
        assert_rel_close("singular values", s, sr, 1e-12)
        assert_rel_close("rank-3 reconstruction", (u * s) @ v.mT, (ur * sr) @ vr.mT, 1e-12)
        assert_rel_close("left projector", u @ u.mT, ur @ ur.mT, 1e-12)
        assert_rel_close("right projector", v @ v.mT, vr @ vr.mT, 1e-12)
        full = factor.svd(100)[1]
        assert full.numel() == min(m, r, n)  # rank r (or less), never padded


def test_bad_adapters_are_refused_with_names(tmp_path):
    base = make_base()
    cfg, tensors, _ = make_adapters(base)[2]
    with pytest.raises(ValueError, match="DoRA"):
        lora.load_adapter(save_adapter(tmp_path / "dora", {**cfg, "use_dora": True}, tensors))
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        lora.load_adapter(save_adapter(tmp_path / "ia3", {**cfg, "peft_type": "IA3"}, tensors))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tmp_path)
    only_a = {k: v for k, v in tensors.items() if "lora_A" in k}
    with pytest.raises(ValueError, match="c_attn.*not both"):
        lora.load_adapter(save_adapter(tmp_path / "half", cfg, only_a))
    other = {k.replace("c_attn", "c_proj"): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match="model.layers.0.mlp.c_proj.weight.*does not have"):
        lora_tsv_merge(base, [save_adapter(tmp_path / "other", cfg, other)])
    wrong = {k: (v[:, :20] if "lora_A" in k else v) for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"c_attn.weight.*shape \(20, 36\).*\(24, 36\)"):
        lora_tsv_merge(base, [save_adapter(tmp_path / "wrong", cfg, wrong)])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / lora.CONFIG_NAME).write_text(json.dumps(cfg))
    torch.save({"module": torch.nn.Linear(2, 2)}, pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        lora.load_adapter(pickled)


def test_cli_merges_adapter_folders(saved, tmp_path):
    base, _, paths = saved
    base32 = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
    save_file(base32, str(tmp_path / "base.safetensors"))
    result = cli("merge", "-b", tmp_path / "base.safetensors", *paths, "-o", tmp_path / "out.safetensors",
                 "--no-progress", "--alpha", "0.5")
    assert result.returncode == 0, result.stderr
    assert "LoRA adapters" in result.stdout
    out = load_file(str(tmp_path / "out.safetensors"))
    want = lora_tsv_merge(base32, paths, alpha=0.5)
    assert out.keys() == want.keys()
    for key, value in want.items():
        assert_same_result(key, out[key], value)  # another process: equal up to thread-count rounding
    mixed = cli("merge", "-b", tmp_path / "base.safetensors", paths[0], tmp_path / "base.safetensors",
                "-o", tmp_path / "mixed.safetensors")
    assert mixed.returncode != 0 and "mix LoRA adapters" in mixed.stderr and not (tmp_path / "mixed.safetensors").exists()
    exact = cli("merge", "-b", tmp_path / "base.safetensors", *paths, "-o", tmp_path / "x.safetensors", "--exact")
    assert exact.returncode != 0 and "already exact" in exact.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lora_merge_on_cuda_matches_cpu(saved):
    base, _, paths = saved
    cpu = lora_tsv_merge(base, paths, compute_dtype=F64)
    gpu = lora_tsv_merge(base, paths, compute_dtype=F64, device="cuda")
    for key, value in cpu.items():
        assert gpu[key].device.type == "cpu"  # results return to the base's device
        if value.is_floating_point():
            assert_rel_close(f"cuda {key}", gpu[key] - base[key], value - base[key], 1e-10)
        else:
            assert torch.equal(gpu[key], value)
