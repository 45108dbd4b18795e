"""Merged LoRA adapters out (lora_tsv_merge(output="adapter"), tsv-fast merge --as-adapter), checked
with real PEFT: adapters built by ``peft`` itself on tiny transformers models (LoRA and rsLoRA,
rank_pattern / alpha_pattern, embedding LoRA, Conv1D layers with fan_in_fan_out, lora_only biases,
modules_to_save), merged by tsv_fast, loaded back with ``PeftModel.from_pretrained`` and compared

* with the full-weight route (``lora_tsv_merge`` writing merged weights): the model outputs and
  ``merge_and_unload()`` weights, equal up to float32 rounding;
* with the float64 reference (``tsv_fast.reference``) on the dense task vectors that PEFT itself
  makes of each input adapter (``merge_and_unload`` of a float64 model): within the accuracy contract.
"""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

import tsv_fast
from tsv_fast import reference
from tsv_fast.io.peft import load_adapter
from tsv_fast.io.peft_out import AdapterSink
from tsv_fast.testing import CONTRACT_FLOOR, assert_rel_close, rel_fro

from optional import need
from test_cli import cli

F64 = torch.float64
pytestmark = pytest.mark.hf  # also run by .ci/hf_stack.sh, where peft and transformers must import


def llama(transformers):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM, config, {"lm_head", "model.norm"}, [
        # LoRA r = 4 with a per-module rank (up_proj: 2) and modules_to_save
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"up_proj": 2},
             modules_to_save=["lm_head"]),
        # rsLoRA r = 6 with a per-module alpha and an embedding LoRA
        dict(r=6, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
             alpha_pattern={"v_proj": 3}),
        # LoRA r = 3 on other modules, the final norm saved whole
        dict(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj", "gate_proj"], modules_to_save=["model.norm"]),
    ]


def gpt2(transformers):
    config = transformers.GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel, config, {"transformer.ln_f"}, [
        # Conv1D layers (fan_in_fan_out), trained biases of the LoRA layers, a layer norm saved whole
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, bias="lora_only",
             modules_to_save=["ln_f"]),
        dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_rslora=True),
    ]


MODELS = {"llama": llama, "gpt2": gpt2}


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT / transformers deprecation chatter
        return fn(*args, **kwargs)


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request, tmp_path_factory):
    """A tiny base model (saved as a HF folder) and adapters made by peft, with random weights."""
    peft = need("peft")
    cls, config, whole, adapter_configs = MODELS[request.param](need("transformers"))
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = cls(config).eval()
    base.save_pretrained(folder / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for i, kwargs in enumerate(adapter_configs):
        model = cls(config)
        model.load_state_dict(state)
        model.name_or_path = str(folder / "base")  # what PEFT records as base_model_name_or_path
        lora = quiet(peft.get_peft_model, model, peft.LoraConfig(**kwargs))
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():  # PEFT starts B at zero; give every trainable tensor a real update
            for name, param in lora.named_parameters():
                if param.requires_grad:
                    scale = 0.2 if "lora_" in name else 0.05
                    param.add_(scale * torch.randn(param.shape, generator=generator))
        quiet(lora.save_pretrained, folder / f"adapter{i}")
        paths.append(folder / f"adapter{i}")
    return cls, config, state, folder, paths, whole


def model_with(cls, config, state, dtype=torch.float32):
    model = cls(config)
    model.load_state_dict(state)
    return model.to(dtype).eval()


def peft_weights(cls, config, state, adapter, dtype=torch.float32) -> dict:
    """PEFT's own merge of ``adapter`` into the base: merge_and_unload() of a ``dtype`` model."""
    model = quiet(need("peft").PeftModel.from_pretrained, model_with(cls, config, state, dtype), str(adapter))
    return {k: v.detach().clone() for k, v in quiet(model.merge_and_unload).state_dict().items()}


def tokens(config):
    return torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))


def floating(state):
    return [k for k, v in state.items() if v.is_floating_point()]


def test_merged_adapter_loads_in_peft_and_reproduces_the_full_weight_merge(setup, tmp_path):
    cls, config, state, folder, paths, whole = setup
    base_name = str(folder / "base")
    full = tsv_fast.lora_tsv_merge(state, paths)
    adapter = tsv_fast.lora_tsv_merge(state, paths, output="adapter")
    adapter.save(tmp_path / "merged", inputs=paths)
    saved = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"]
    for pattern, rank in saved["rank_pattern"].items():
        assert saved["alpha_pattern"][pattern] == rank  # PEFT's scale is 1 on every module
    assert len(set(adapter.ranks.values())) > 1  # modules of several ranks: rank_pattern says which
    assert saved["rank_pattern"] == {re.escape(m): r for m, r in adapter.ranks.items() if r != saved["r"]}
    assert saved["base_model_name_or_path"] == base_name
    assert set(saved["modules_to_save"]) == whole
    biases = [k for k in adapter.tensors if k.endswith(".base_layer.bias")]  # PEFT's place for a LoRA layer's bias
    assert bool(biases) == (saved["bias"] == "lora_only")
    # outputs of the merged adapter in PEFT against the model with the merged weights
    loaded = quiet(need("peft").PeftModel.from_pretrained, model_with(cls, config, state), str(tmp_path / "merged"))
    reference_model = model_with(cls, config, {**state, **full})
    with torch.no_grad():
        got, want = loaded(tokens(config)).logits, reference_model(tokens(config)).logits
    assert_rel_close("logits: PEFT + merged adapter vs merged weights", got, want, 1e-5)
    # merge_and_unload(): the same weights up to float32 rounding of W
    merged = {k: v for k, v in quiet(loaded.merge_and_unload).state_dict().items()}
    for key in floating(state):
        assert_rel_close(f"{key}: W", merged[key], full[key], 2e-7)
        if not torch.equal(full[key], state[key]):
            assert_rel_close(f"{key}: W - W_pre", merged[key] - state[key], full[key] - state[key], 1e-5)


@pytest.mark.parametrize("method", ["tsv-m", "iso-c", "iso-cts", "ta"])
def test_merged_adapter_update_equals_the_float64_reference_on_peft_task_vectors(setup, tmp_path, method):
    cls, config, state, _, paths, whole = setup
    state64 = {k: v.to(F64) if v.is_floating_point() else v for k, v in state.items()}
    keys = floating(state)
    task_vectors = []
    for path in paths:  # PEFT's own dense Δ of each adapter, in float64
        weights = peft_weights(cls, config, state, path, F64)
        task_vectors.append({k: weights[k] - state64[k] for k in keys})
    twin = {"tsv-m": reference.fast_tsv_merge, "iso-c": reference.iso_c, "iso-cts": reference.iso_cts,
            "ta": lambda tvs, **kw: {k: sum(tv[k] for tv in tvs) for k in tvs[0]}}[method]
    want = twin(task_vectors, compute_dtype=F64)
    # float32: the default route, stored in the inputs' dtype; float64: computed and stored in float64
    for dtype, bound in ((torch.float32, CONTRACT_FLOOR), (F64, 1e-9)):
        sink = AdapterSink([load_adapter(p) for p in paths], dtype=F64) if dtype == F64 else None
        adapter = tsv_fast.lora_tsv_merge(state64 if dtype == F64 else state, paths, method=method, alpha=0.9,
                                          output="adapter", sink=sink, compute_dtype=dtype)
        assert {t.dtype for t in adapter.tensors.values()} == {dtype}
        adapter.save(tmp_path / f"{method}-{dtype}", inputs=paths)
        got = peft_weights(cls, config, state, tmp_path / f"{method}-{dtype}", F64)
        for key in keys:
            if want[key].any():
                assert_rel_close(f"{method} {dtype} {key}", got[key] - state64[key], 0.9 * want[key], bound)
            else:
                assert torch.equal(got[key], state64[key])


@pytest.mark.parametrize("method", ["tsv-m", "ta"])  # Iso's flat spectra have no unique best rank-R cut
def test_max_rank_keeps_the_top_triplets_and_reports_the_energy(setup, tmp_path, method):
    cls, config, state, _, paths, whole = setup
    state64 = {k: v.to(F64) if v.is_floating_point() else v for k, v in state.items()}
    full = tsv_fast.lora_tsv_merge(state64, paths, method=method, compute_dtype=F64)
    adapter = tsv_fast.lora_tsv_merge(state64, paths, method=method, output="adapter", max_rank=3, compute_dtype=F64)
    assert max(adapter.ranks.values()) == 3
    adapter.save(tmp_path / "r3", inputs=paths)
    got = peft_weights(cls, config, state, tmp_path / "r3", F64)
    kept = total = 0.0
    for module, energy in adapter.energy.items():
        key = module + ".weight"
        update = full[key] - state64[key]
        u, s, vh = torch.linalg.svd(update)
        best = (u[:, :3] * s[:3]) @ vh[:3]  # the best rank-3 approximation (Eckart-Young)
        assert_rel_close(f"rank-3 {key}", got[key] - state64[key], best, 2e-6)
        assert energy == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
        kept, total = kept + float((s[:3] ** 2).sum()), total + float((s ** 2).sum())
    assert min(adapter.energy.values()) < 1  # the cut is real here
    assert float(adapter.metadata["energy_kept"]) == pytest.approx(kept / total, rel=1e-9)


def test_cli_as_adapter(setup, tmp_path):
    cls, config, state, folder, paths, _ = setup
    out = tmp_path / "merged-lora"
    result = cli("merge", "-b", folder / "base", *paths, "--as-adapter", "-o", out, "--max-rank", "4",
                 "--method", "ta", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "kept" in result.stdout and "energy" in result.stdout
    want = tsv_fast.lora_tsv_merge(state, paths, method="ta", output="adapter", max_rank=4)
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == want.tensors.keys()
    for key in want.ranks:  # factors of the same update, up to the signs of singular vectors
        k = next(k for k in got if k.startswith(f"base_model.model.{key}.") and "_B" in k)
        a = k.replace("_B", "_A")
        assert_rel_close(f"cli {key}", got[k] @ got[a], want.tensors[k] @ want.tensors[a], 1e-5)
    loaded = quiet(need("peft").PeftModel.from_pretrained, model_with(cls, config, state), str(out))
    with torch.no_grad():  # the adapter loads and changes the model
        assert rel_fro(loaded(tokens(config)).logits, model_with(cls, config, state)(tokens(config)).logits) > 1e-3
    again = cli("merge", "-b", folder / "base", *paths, "--as-adapter", "-o", paths[0], "--no-progress")
    assert again.returncode != 0 and "input" in again.stderr  # never over an input adapter
    full = cli("merge", "-b", folder / "base", *paths, "-o", tmp_path / "w.safetensors", "--max-rank", "4")
    assert full.returncode != 0 and "--as-adapter" in full.stderr
