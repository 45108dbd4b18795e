"""The Hugging Face round trip: `save_pretrained` folders (and hub ids from a cache) merged with the
command line, loaded back with `from_pretrained`; open_clip and timm layouts key for key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tsv_fast
from tsv_fast.io.hf import config_with_dtype, is_hub_id, loadable_files
from tsv_fast.io.outputs import safetensors_metadata
from tsv_fast.testing import assert_same_result

from optional import need

pytestmark = pytest.mark.hf  # also run by .ci/hf_stack.sh, where transformers and huggingface_hub must import
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "merge", "##s", "task"]


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsv_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, cwd=cwd)


def perturbed(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1e-2 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def transformers():
    return need("transformers")


@pytest.fixture(scope="module")
def bert(tmp_path_factory, transformers):
    """A tiny BERT saved by save_pretrained (with a tokenizer), two fine-tunes of it, and the old
    `embeddings.position_ids` buffer that today's transformers no longer saves, in the base only."""
    folder = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=24)
    torch.manual_seed(0)
    (folder / "vocab.txt").write_text("\n".join(VOCAB))
    tokenizer = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    paths = []
    for i in range(3):
        model = transformers.BertModel(config)
        if i:
            model.load_state_dict(load_file(str(paths[0] / "model.safetensors")), strict=False)
            perturbed(model, seed=i)
        path = folder / ("base" if i == 0 else f"ft{i}")
        model.save_pretrained(path)
        paths.append(path)
    tokenizer.save_pretrained(paths[0])
    weights = load_file(str(paths[0] / "model.safetensors"))
    weights["embeddings.position_ids"] = torch.arange(24).unsqueeze(0)
    save_file(weights, str(paths[0] / "model.safetensors"), metadata={"format": "pt"})
    return paths


def load_merged(folder: Path):
    model, info = need("transformers").AutoModel.from_pretrained(folder, output_loading_info=True)
    return model, info


def forward_is_finite(model) -> bool:
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        return bool(torch.isfinite(model(input_ids=ids).last_hidden_state).all())


def test_merge_of_save_pretrained_folders_loads_with_from_pretrained(bert, tmp_path, transformers):
    base, ft1, ft2 = bert
    out = tmp_path / "merged"
    result = cli("merge", "-b", base, ft1, ft2, "-o", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    # the old buffer comes from the base, named in one warning line
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("embeddings.position_ids" in line for line in warned), result.stderr
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    model, info = load_merged(out)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert forward_is_finite(model)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    # the loaded weights are the merge of the three folders
    merged = load_file(str(out / "model.safetensors"))
    pre = load_file(str(base / "model.safetensors"))
    fts = [load_file(str(p / "model.safetensors")) for p in (ft1, ft2)]
    pre_common = {k: v for k, v in pre.items() if k != "embeddings.position_ids"}
    expected = tsv_fast.tsv_merge(pre_common, fts)
    assert merged.keys() == pre.keys() and torch.equal(merged["embeddings.position_ids"], pre["embeddings.position_ids"])
    for key, value in expected.items():
        assert_same_result(key, merged[key], value)
    state = model.state_dict()
    for key in expected:
        assert torch.equal(state[key], merged[key]), key
    tokens = transformers.AutoTokenizer.from_pretrained(out)("hello merges task")["input_ids"]
    assert tokens == transformers.AutoTokenizer.from_pretrained(base)("hello merges task")["input_ids"]


def test_reconstruct_output_loads_with_from_pretrained_in_its_dtype(bert, tmp_path):
    base, ft1, ft2 = bert
    result = cli("compress", "-b", base, ft1, ft2, "-o", tmp_path / "tasks.tsvc", "--no-progress")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "task1"
    result = cli("reconstruct", tmp_path / "tasks.tsvc", "--task", 1, "-b", base, "-o", out, "--out-dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, info = load_merged(out)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16 and forward_is_finite(model)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_llama_sharded_merge_keeps_generation_config(tmp_path, transformers):
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    paths = []
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config)
    for i in range(3):
        if i:
            perturbed(model, seed=10 + i)
        model.save_pretrained(tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    assert (paths[0] / "generation_config.json").is_file()
    out = tmp_path / "merged"
    result = cli("merge", "-b", *paths, "-o", out, "--max-shard-size", "40KB", "--out-dtype", "bfloat16", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors.index.json").is_file() and (out / "generation_config.json").is_file()
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        assert bool(torch.isfinite(merged(input_ids=torch.tensor([[1, 5, 7]])).logits).all())


def test_file_output_and_no_copy_configs(bert, tmp_path):
    base, ft1, ft2 = bert
    result = cli("merge", "-b", base, ft1, ft2, "-o", tmp_path / "merged.safetensors", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "configs and tokenizer files" in result.stderr and "were not copied" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]
    result = cli("merge", "-b", base, ft1, ft2, "-o", tmp_path / "bare", "--no-copy-configs", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["model.safetensors"]


def test_loadable_files_set_the_dtype_of_transformers_configs_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "torch_dtype": "float32"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "README.md").write_text("not copied")
    files = loadable_files(tmp_path, "bfloat16")
    assert sorted(files) == ["config.json", "tokenizer.json"]
    assert json.loads(files["config.json"]) == {"model_type": "bert", "torch_dtype": "bfloat16"}
    timm = tmp_path / "timm.json"
    timm.write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 10}))
    assert config_with_dtype(timm, "float16") == timm  # not a transformers config: copied as it is


# ------------------------------------------------------------------------------------------------
# open_clip and timm: the key layout is the contract
# ------------------------------------------------------------------------------------------------
def open_clip_layout(width=32, layers=2, ctx=8, vocab=40, out=16):
    shapes = {"positional_embedding": (ctx, width), "text_projection": (width, out), "logit_scale": (),
              "token_embedding.weight": (vocab, width), "ln_final.weight": (width,), "ln_final.bias": (width,)}
    for name, grid in (("visual.", 4), ("", None)):
        if grid:
            shapes.update({"visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
                           "visual.conv1.weight": (width, 3, 4, 4), "visual.ln_pre.weight": (width,),
                           "visual.ln_pre.bias": (width,), "visual.ln_post.weight": (width,),
                           "visual.ln_post.bias": (width,), "visual.proj": (width, out)})
        for i in range(layers):
            p = f"{name}transformer.resblocks.{i}."
            shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                           p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                           p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                           p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                           p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
                           p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,)})
    return shapes


def timm_layout(width=32, layers=2, classes=10):
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 17, width), "patch_embed.proj.weight": (width, 3, 4, 4),
              "patch_embed.proj.bias": (width,), "norm.weight": (width,), "norm.bias": (width,),
              "head.weight": (classes, width), "head.bias": (classes,),
              # a ResNet-style stem: BatchNorm buffers, num_batches_tracked is int64
              "stem.conv.weight": (width, 3, 3, 3), "stem.bn.weight": (width,), "stem.bn.bias": (width,),
              "stem.bn.running_mean": (width,), "stem.bn.running_var": (width,), "stem.bn.num_batches_tracked": ()}
    for i in range(layers):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (width,), p + "norm1.bias": (width,),
                       p + "attn.qkv.weight": (3 * width, width), p + "attn.qkv.bias": (3 * width,),
                       p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
                       p + "norm2.weight": (width,), p + "norm2.bias": (width,),
                       p + "mlp.fc1.weight": (4 * width, width), p + "mlp.fc1.bias": (4 * width,),
                       p + "mlp.fc2.weight": (width, 4 * width), p + "mlp.fc2.bias": (width,)})
    return shapes


def state_dicts(shapes, num_tasks=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pre = {k: (torch.tensor(100) if k.endswith("num_batches_tracked") else torch.randn(s, generator=generator))
           for k, s in shapes.items()}
    fts = [{k: (v + 1 if not v.is_floating_point() else v + 1e-2 * torch.randn(v.shape, generator=generator))
            for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


@pytest.mark.parametrize("library", ["open_clip", "timm"])
def test_open_clip_and_timm_layouts_merge_key_for_key(library, tmp_path):
    shapes = open_clip_layout() if library == "open_clip" else timm_layout()
    pre, fts = state_dicts(shapes)
    weights, config = (("open_clip_model.safetensors", "open_clip_config.json") if library == "open_clip"
                       else ("model.safetensors", "config.json"))
    config_text = json.dumps({"model_cfg": {"embed_dim": 16}} if library == "open_clip"
                             else {"architecture": "vit_tiny_patch16_224", "num_classes": 10})
    folders = []
    for i, sd in enumerate([pre, *fts]):
        folder = tmp_path / f"{library}{i}"
        folder.mkdir()
        save_file(sd, str(folder / weights))
        (folder / config).write_text(config_text)
        folders.append(folder)
    out = tmp_path / "merged"
    result = cli("merge", "-b", *folders, "-o", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    merged = load_file(str(out / "model.safetensors"))
    assert merged.keys() == pre.keys()  # every key, none added
    assert all(merged[k].shape == pre[k].shape and merged[k].dtype == pre[k].dtype for k in pre)
    assert all(bool(torch.isfinite(v).all()) for v in merged.values() if v.is_floating_point())
    expected = tsv_fast.tsv_merge(pre, fts)
    for key, value in expected.items():
        assert_same_result(key, merged[key], value)
    assert (out / config).read_text() == config_text  # not a transformers config: copied as it is
    if library == "timm":  # an integer buffer comes from the base
        assert int(merged["stem.bn.num_batches_tracked"]) == 100


# ------------------------------------------------------------------------------------------------
# Hugging Face model ids, offline against a cache built here
# ------------------------------------------------------------------------------------------------
def hub_entry(cache: Path, repo: str, tensors: dict, revision: str = "main", commit: str | None = None,
              config: dict | None = None) -> str:
    """models--org--name/snapshots/<commit>/{model.safetensors, config.json} and refs/<revision>."""
    commit = commit or f"{abs(hash((repo, revision))) % 16**40:040x}"
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(tensors, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps(config or {"model_type": "tiny", "dtype": "float32"}))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture()
def hub(tmp_path):
    need("huggingface_hub._snapshot_download")  # the CLI resolves the ids with it (imported lazily there)
    pre, fts = state_dicts(timm_layout(), num_tasks=3, seed=5)
    cache = tmp_path / "hub"
    hub_entry(cache, "org/base", pre)
    hub_entry(cache, "org/ft0", fts[0])
    hub_entry(cache, "org/ft1", {k: torch.zeros_like(v) for k, v in fts[1].items()})  # main: another model
    hub_entry(cache, "org/ft1", fts[1], revision="v1")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return pre, fts, cache, env


def test_model_ids_resolve_offline_from_the_cache(hub, tmp_path):
    pre, fts, cache, env = hub
    save_file(fts[2], str(tmp_path / "ft2.safetensors"))
    out = tmp_path / "out"
    result = cli("merge", "-b", "org/base", "org/ft0", "org/ft1@v1", tmp_path / "ft2.safetensors", "-o", out,
                 "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    merged = load_file(str(out / "model.safetensors"))
    expected = tsv_fast.tsv_merge(pre, fts)
    for key, value in expected.items():
        assert_same_result(key, merged[key], value)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "tiny", "dtype": "float32"}  # the snapshot's
    meta = safetensors_metadata(out / "model.safetensors")  # inputs named as the user wrote them
    assert meta["base_model"] == "org/base"
    assert json.loads(meta["models"]) == ["org/ft0", "org/ft1@v1", "ft2.safetensors"]
    # a YAML config next to a local fine-tune: ids stay ids, relative paths are relative to the config
    conf = tmp_path / "conf"
    conf.mkdir()
    save_file(fts[2], str(conf / "ft2.safetensors"))
    (conf / "merge.yaml").write_text("base_model: org/base\nmodels: [org/ft0, org/ft1@v1, ft2.safetensors]\n"
                                     "output: merged.safetensors\n")
    result = cli("merge", "-c", conf / "merge.yaml", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    merged = load_file(str(conf / "merged.safetensors"))
    for key, value in expected.items():
        assert_same_result(key, merged[key], value)


def test_a_path_that_exists_wins_over_an_id(hub, tmp_path):
    pre, fts, cache, env = hub
    local = tmp_path / "org" / "ft0"
    local.mkdir(parents=True)
    save_file(fts[2], str(local / "model.safetensors"))  # a local folder named like the id, other weights
    result = cli("merge", "-b", "org/base", "org/ft0", "org/ft1@v1", "-o", tmp_path / "m.safetensors", "--no-progress",
                 env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged = load_file(str(tmp_path / "m.safetensors"))
    expected = tsv_fast.tsv_merge(pre, [fts[2], fts[1]])
    for key, value in expected.items():
        assert_same_result(key, merged[key], value)


def test_an_id_not_in_the_cache_offline_is_one_line(hub, tmp_path):
    _, _, _, env = hub
    result = cli("merge", "-b", "org/base", "org/nothere", "-o", tmp_path / "m.safetensors", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "org/nothere" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("text, hub_id", [("org/name", True), ("org/name@v1.0", True), ("org/name@refs/pr/3", True),
                                          ("a/b/c", False), ("ft.safetensors", False), ("dir/model.safetensors", False),
                                          ("./org/name", False), ("/abs/path", False), ("name", False),
                                          ("org/tasks.tsvc", False)])
def test_what_counts_as_a_model_id(text, hub_id):
    assert is_hub_id(text) is hub_id


BROKEN_SSL = '''import sys
class BrokenSSL:  # as a Python whose _ssl extension fails to load: huggingface_hub cannot import
    def find_spec(self, name, path=None, target=None):
        if name == "_ssl":
            raise ImportError("_ssl.cpython-311-x86_64-linux-gnu.so: undefined symbol: _PyModule_Add")
sys.meta_path.insert(0, BrokenSSL())
'''


def test_a_python_without_ssl_merges_files_and_names_the_cause_for_a_model_id(tmp_path):
    """A CI machine's Python had a broken ssl module: local inputs must merge as usual there, and a
    model id must get one line naming the cause, not "pip install huggingface_hub"."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_SSL)
    env = {"PYTHONPATH": str(site)}
    pre, fts = state_dicts(timm_layout(), num_tasks=2, seed=3)
    paths = []
    for i, weights in enumerate([pre, *fts]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(weights, str(paths[-1]))
    result = cli("merge", "-b", *paths, "-o", tmp_path / "out.safetensors", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    merged = load_file(str(tmp_path / "out.safetensors"))
    for key, value in tsv_fast.tsv_merge(pre, fts).items():
        assert_same_result(key, merged[key], value)
    result = cli("merge", "-b", paths[0], paths[1], "org/ft", "-o", tmp_path / "id.safetensors", env=env)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "org/ft" in result.stderr and "cannot be imported in this Python" in result.stderr
    assert "undefined symbol" in result.stderr and not (tmp_path / "id.safetensors").exists()
