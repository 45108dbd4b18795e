"""tsv_fast's methods inside real mergekit (0.1.5): a tiny LLaMA saved with save_pretrained and 3
fine-tunes, merged by `tsv-fast mergekit` (mergekit's own merge) and compared key by key with
`tsv-fast merge` of the same inputs, with the float64 reference, and loaded back with transformers.

mergekit is an optional extra: without it (or where it cannot be imported) this module skips, unless
TSV_FAST_REQUIRE names it (set by .ci/hf_stack.sh, so that CI fails instead of skipping).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optional import need

need("mergekit")  # at collection, as the module imports the bridge: a skip or failure of the whole module
transformers = need("transformers")
# mergekit's lazy unpickler touches numpy.core at import; not ours to fix
pytestmark = [pytest.mark.hf, pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")]

import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import tsv_fast  # noqa: E402
from tsv_fast import reference  # noqa: E402
from tsv_fast.cli import app  # noqa: E402
from tsv_fast.integrations import mergekit as bridge  # noqa: E402
from tsv_fast.testing import assert_rel_close, assert_same_result, contract_bound, rel_fro  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, T = 96, 3
WEIGHTS = (1.0, 0.5, 2.0)  # ft1's task vector halved, ft2's doubled, in both routes


def llama(vocab: int = VOCAB):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base/ (with a tokenizer), ft0..ft2/: low-rank task updates sharing part of a subspace, plus
    small noise; wide/: a fine-tune whose vocabulary (embeddings, head) has 4 more rows."""
    root = tmp_path_factory.mktemp("mergekit")
    torch.manual_seed(0)
    model = llama()
    model.save_pretrained(root / "base")
    save_tokenizer(root / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    shared = {k: torch.randn(v.shape[0], 2, generator=gen) for k, v in base.items() if v.ndim == 2}
    for t in range(T):
        with torch.no_grad():
            for key, param in model.named_parameters():
                noise = 0.002 * torch.randn(param.shape, generator=gen)
                if param.ndim == 2:
                    left = torch.cat([shared[key], torch.randn(param.shape[0], 3, generator=gen)], dim=1)
                    update = 0.02 * left @ torch.randn(5, param.shape[1], generator=gen)
                else:
                    update = 0.05 * torch.randn(param.shape, generator=gen)
                param.copy_(base[key] + update + noise)
        model.save_pretrained(root / f"ft{t}")
    model.load_state_dict(base)
    llama(VOCAB + 4).save_pretrained(root / "wide")
    return root


def load_dir(folder: Path) -> dict:
    """All tensors of a (sharded) safetensors model folder."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def mergekit_config(root: Path, method: str, parameters: dict, **extra) -> dict:
    models = [{"model": str(root / f"ft{t}"), **({"parameters": {"weight": w}} if w != 1.0 else {})}
              for t, w in enumerate(WEIGHTS)]
    return {"base_model": str(root / "base"), "models": models, "merge_method": method, "parameters": parameters,
            "dtype": "float32", **extra}


def tsv_fast_merge(root: Path, method: str, parameters: dict, out: Path) -> dict:
    """The same inputs through `tsv-fast merge -c` (its YAML takes the same per-model weight)."""
    config = mergekit_config(root, method, parameters)
    del config["dtype"]  # tsv-fast merge's `dtype` is the compute dtype; both default to the inputs'
    config["output"] = str(out)
    result = cli("merge", "-c", write(out.parent / f"{out.name}.yml", config), "--no-progress")
    assert result.exit_code == 0, result.output
    return load_dir(out)


def weighted(root: Path):
    """(base, fine-tunes with the weights applied to their task vectors), float64 state dicts."""
    base = {k: v.double() for k, v in load_dir(root / "base").items()}
    fts = [load_dir(root / f"ft{t}") for t in range(T)]
    return base, [{k: base[k] + w * (ft[k].double() - base[k]) for k in base} for ft, w in zip(fts, WEIGHTS)]


def check_contract(got: dict, base: dict, want64: dict, want32: dict) -> None:
    """Merged task vectors M = W - W_pre against the float64 reference, within the accuracy contract
    (3x the error of the same reference run in float32, never tighter than 1e-5)."""
    for key, value in got.items():
        delta, want = value.double() - base[key], want64[key]
        bound = contract_bound(rel_fro(want32[key].double(), want))
        assert_rel_close(key, delta, want, max(bound, 1e-5))


@pytest.fixture(scope="module")
def tsv_out(models):
    out = models / "out_tsv"
    params = {"alpha": 0.8, "rank_fraction": 0.25}
    result = cli("mergekit", write(models / "tsv.yml", mergekit_config(models, "tsv", params)), out,
                 "--copy-tokenizer", "--lazy-unpickle", "--out-shard-size", "20K")
    assert result.exit_code == 0, result.output
    return out, params


def test_tsv_equals_tsv_fast_merge(models, tsv_out):
    out, params = tsv_out
    got = load_dir(out)
    want = tsv_fast_merge(models, "tsv-m", params, models / "tf_tsv")
    assert got.keys() == want.keys() and len(got) == 21
    for key in want:
        assert got[key].dtype == want[key].dtype == torch.float32, key
        assert_same_result(key, got[key], want[key])
    # and against the float64 reference (matrices: TSV-M at k = int(r/4); 1-D: the weighted mean)
    base, fts = weighted(models)
    tvs = [{k: ft[k] - base[k] for k in base} for ft in fts]
    m64 = {k: 0.8 * v for k, v in reference.fast_tsv_merge(tvs, rank_fraction=0.25, compute_dtype=torch.float64).items()}
    tvs32 = [{k: v.float() for k, v in tv.items()} for tv in tvs]
    m32 = {k: 0.8 * v for k, v in reference.fast_tsv_merge(tvs32, rank_fraction=0.25).items()}
    check_contract(got, base, m64, m32)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.allclose(got[norm].double(), base[norm] + 0.8 * sum(tv[norm] for tv in tvs) / T, atol=1e-6)


def test_mergekit_options_reach_mergekit(tsv_out):
    out, _ = tsv_out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # --out-shard-size 20K split the output
    assert (out / "tokenizer.json").is_file()  # --copy-tokenizer
    assert "merge_method: tsv" in (out / "mergekit_config.yml").read_text()


def test_iso_cts_equals_tsv_fast_merge(models):
    params = {"alpha": 1.2, "common_space_fraction": 0.6, "exclude": "lm_head,nothing_matches"}
    out = models / "out_iso_cts"
    # the console command in a fresh process (it registers the methods itself), run from the clone
    # root, whose kernels/ folder must not shadow the `kernels` package transformers imports
    proc = subprocess.run([sys.executable, "-m", "tsv_fast", "mergekit",
                           str(write(models / "iso_cts.yml", mergekit_config(models, "iso_cts", params))), str(out),
                           "--no-copy-tokenizer"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done in" in proc.stdout
    got = load_dir(out)
    want = tsv_fast_merge(models, "iso-cts", {**params, "exclude": ["lm_head", "nothing_matches"]},
                          models / "tf_iso_cts")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert_same_result(key, got[key], want[key])
    base, fts = weighted(models)
    tvs = [{k: ft[k] - base[k] for k in base} for ft in fts]
    ref = dict(common_space_fraction=0.6, exclude=("lm_head",))
    m64 = {k: 1.2 * v for k, v in reference.iso_cts(tvs, compute_dtype=torch.float64, **ref).items()}
    m32 = {k: 1.2 * v for k, v in reference.iso_cts([{k: v.float() for k, v in tv.items()} for tv in tvs],
                                                    **ref).items()}
    check_contract(got, base, m64, m32)
    # lm_head is excluded: the weighted mean task vector, not an isotropic matrix
    head = "lm_head.weight"
    assert torch.allclose(got[head].double(), base[head] + 1.2 * sum(tv[head] for tv in tvs) / T, atol=1e-6)


def test_output_loads_with_transformers(models, tsv_out):
    out, _ = tsv_out
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    files = load_dir(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, files[key]), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w3 w5 w7", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, VOCAB) and bool(torch.isfinite(logits).all())


def test_iso_c_and_task_rebuild_through_mergekit_api(models):
    """mergekit's in-memory API (merge_state_dicts) with iso_c, and tsv_c_task against TSV-C."""
    from mergekit.merge_methods import merge_state_dicts

    base = load_dir(models / "base")
    fts = [load_dir(models / f"ft{t}") for t in range(T)]
    inputs = {"base": base, **{f"ft{t}": ft for t, ft in enumerate(fts)}}
    got = merge_state_dicts(inputs, "iso_c", base="base",
                            parameters={"alpha": 0.7, "weight": {f"ft{t}": w for t, w in enumerate(WEIGHTS)}})
    want = tsv_fast.merge(base, fts, method="iso-c", alpha=0.7, weights=list(WEIGHTS))
    for key in want:
        assert_same_result(key, got[key], want[key])
    rebuilt = merge_state_dicts(inputs, "tsv_c_task", base="base", parameters={"task": 2})
    want = tsv_fast.compress(base, fts).reconstruct(2, base)
    for key in want:
        assert_same_result(key, rebuilt[key], want[key])
    assert rel_fro(rebuilt["lm_head.weight"], fts[2]["lm_head.weight"]) > 1e-4  # truncated, not a copy


@pytest.mark.parametrize("method, ours", [("tsv", "tsv-m"), ("iso_cts", "iso-cts")])
def test_bfloat16_tensors_keep_their_dtype(models, method, ours):
    """mergekit's `dtype: bfloat16` hands the method bf16 tensors: the engine reads them like bf16
    checkpoints (float64 Grams) and writes bf16, as tsv-fast merge does for bf16 inputs."""
    from mergekit.merge_methods import merge_tensors

    base = {k: v.bfloat16() for k, v in load_dir(models / "base").items()}
    fts = [{k: v.bfloat16() for k, v in load_dir(models / f"ft{t}").items()} for t in range(T)]
    want = tsv_fast.merge(base, fts, method=ours)
    for key in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        got = merge_tensors([base[key], *(ft[key] for ft in fts)], method, base_index=0, name=key)
        assert got.dtype == torch.bfloat16
        assert_same_result(key, got, want[key])


# ------------------------------------------------------------------------------------------------
# Errors: one line, naming the place, no traceback
# ------------------------------------------------------------------------------------------------
def refused(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    # mergekit's progress bars may come first; the error is one line, the last, without a traceback
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("change, needles", [
    ({"parameters": {"rank_fraction": 1.5}}, ["parameters.rank_fraction", "less than or equal to 1", "1.5"]),
    ({"parameters": {"alpha": True}}, ["parameters.alpha", "not a boolean"]),
    ({"parameters": {"rank_fractoin": 0.2}}, ["unknown parameter 'rank_fractoin'", "rank_fraction"]),
    ({"parameters": {"exclude": ["lm_head", "embed"]}}, ["exclude", "'lm_head,embed'"]),
    ({"models[1]": {"alpha": 2.0}}, ["models[1].parameters.alpha", "whole merge"]),
    ({"models[1]": {"weight": "heavy"}}, ["models[1].parameters.weight", "valid number", "heavy"]),
    ({"merge_method": "tsv_c_task"}, ["needs the parameter task"]),
])
def test_bad_parameters_are_refused(models, tmp_path, change, needles):
    config = mergekit_config(models, "tsv", {})
    for key, value in change.items():
        if key.startswith("models["):
            config["models"][int(key[7])]["parameters"] = value
        else:
            config[key] = value
    if config["merge_method"] == "tsv_c_task":  # it takes no per-model weight
        for entry in config["models"]:
            entry.pop("parameters", None)
    refused(cli("mergekit", write(tmp_path / "bad.yml", config), tmp_path / "out"), *needles)
    assert not (tmp_path / "out").exists()


def test_mergekit_itself_refuses_bad_values(models):
    """Without the command's checks (mergekit-yaml after an import), the annotations still make
    mergekit refuse a bad value while planning, with its own (pydantic) error."""
    from mergekit.scripts.run_yaml import main
    from pydantic import ValidationError

    config = write(models / "bad_direct.yml", mergekit_config(models, "tsv", {"rank_fraction": 1.5}))
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        main([str(config), str(models / "out_direct"), "--no-copy-tokenizer"], standalone_mode=False)


def test_mismatched_vocabulary_refused_with_mergekits_message(models):
    config = mergekit_config(models, "iso_cts", {})
    config["models"].append({"model": str(models / "wide")})
    line = refused(cli("mergekit", write(models / "wide.yml", config), models / "out_wide", "--no-copy-tokenizer"),
                   "Tensor size mismatch for ", "(96, 32)", "(100, 32)")
    assert "lm_head.weight" in line or "embed_tokens.weight" in line
    assert "tokenizer" in line  # mergekit's hint: align the vocabularies with `tokenizer:`


def test_missing_base_and_bad_options_and_overlap(models):
    config = mergekit_config(models, "tsv", {})
    del config["base_model"]
    refused(cli("mergekit", write(models / "nobase.yml", config), models / "out_nobase"), "requires a base input")
    good = write(models / "good.yml", mergekit_config(models, "tsv", {}))
    refused(cli("mergekit", good, models / "out_x", "--cudaa"), "No such option", "--cudaa")
    refused(cli("mergekit", good), "OUT_PATH")
    refused(cli("mergekit", good, models / "ft1"), "overlaps the input model")
    refused(cli("mergekit", models / "none.yml", models / "out_y"), "config not found")
    # mergekit's own (pydantic) report of a malformed config, folded into one line
    refused(cli("mergekit", write(models / "malformed.yml", {**config, "models": "ft0"}), models / "out_z"),
            "models: Input should be a valid list")


def test_network_failure_names_mergekits_hub_lookup():
    """Offline, mergekit's model card fails on relative model paths (it asks the Hub about them)."""
    from tsv_fast.cli.mergekit import network_hint

    offline = type("ConnectError", (OSError,), {"__module__": "httpx2"})("[Errno -2] Name or service not known")
    assert "--no-write-model-card" in network_hint(offline)
    assert network_hint(ValueError("Tensor size mismatch")) == ""


def test_registration_is_idempotent_and_refuses_foreign_names(monkeypatch):
    from mergekit.merge_methods import get, register, registry

    assert bridge.register_methods() == ("tsv", "iso_c", "iso_cts", "tsv_c_task")
    assert get("tsv") is bridge.tsv_merge
    with pytest.raises(ValueError, match="already registered"):  # mergekit's own rule
        register(bridge.tsv_merge)
    monkeypatch.setitem(registry._METHODS, "iso_c", get("linear"))  # another package's "iso_c"
    with pytest.raises(RuntimeError, match="already has a merge method named 'iso_c'"):
        bridge.register_methods()


@pytest.mark.parametrize("hidden, message", [
    ("mergekit", 'error: mergekit is not installed: pip install "tsv_fast[mergekit]"'),
    ("transformers", "error: mergekit cannot be imported: import of transformers halted; None in sys.modules"),
])
def test_without_mergekit_one_clear_line(tmp_path, hidden, message):
    code = (f"import sys; sys.modules[{hidden!r}] = None\n"
            "from tsv_fast.cli import app\n"
            "app(['mergekit', 'merge.yml', 'out'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_within_contract_of_cpu(models, tsv_out):
    """--cuda: mergekit moves each tensor group to the GPU and the engine computes there."""
    out, params = tsv_out
    result = cli("mergekit", write(models / "tsv_cuda.yml", mergekit_config(models, "tsv", params)),
                 models / "out_cuda", "--cuda", "--no-copy-tokenizer")
    assert result.exit_code == 0, result.output
    got, want = load_dir(models / "out_cuda"), load_dir(out)
    base = load_dir(models / "base")
    for key in want:
        assert_rel_close(key, got[key] - base[key], want[key] - base[key], 1e-5)
