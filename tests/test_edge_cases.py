"""Inputs as users have them: mismatches, NaN, T = 1, k = 0, rank deficiency, zeros, buffers."""
import warnings

import pytest
import torch

import tsv_fast
from tsv_fast import reference
from tsv_fast.synthetic import task_matrices
from tsv_fast.testing import FLOAT64_BOUND, assert_rel_close

from optional import need


def make_models(num_tasks=3, shape=(20, 12), seed=0):
    generator = torch.Generator().manual_seed(seed)
    pre = {"layer.0.w": torch.randn(shape, generator=generator), "layer.0.b": torch.randn(shape[0], generator=generator)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


def test_missing_key_names_key_and_checkpoint():
    pre, fts = make_models()
    del fts[1]["layer.0.b"]
    with pytest.raises(ValueError, match=r"checkpoint 1 .*missing keys \['layer.0.b'\]"):
        tsv_fast.tsv_merge(pre, fts)


def test_shape_mismatch_names_key_and_shapes():
    pre, fts = make_models()
    fts[2]["layer.0.w"] = torch.zeros(20, 13)
    with pytest.raises(ValueError, match=r"'layer.0.w': shape \(20, 13\) in checkpoint 2"):
        tsv_fast.tsv_merge(pre, fts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_key(bad):
    pre, fts = make_models()
    fts[0]["layer.0.w"][3, 4] = bad
    with pytest.raises(ValueError, match=r"'layer.0.w' of fine-tuned checkpoint 0 contains NaN or Inf"):
        tsv_fast.tsv_merge(pre, fts)
    pre, fts = make_models()
    pre["layer.0.b"][0] = bad
    with pytest.raises(ValueError, match=r"'layer.0.b' of the pretrained checkpoint"):
        tsv_fast.tsv_merge(pre, fts)


def test_no_task_vectors_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        tsv_fast.fast_tsv_merge([])


def test_bad_options_are_errors():
    _, fts = make_models()
    with pytest.raises(ValueError, match="compute_dtype"):
        tsv_fast.fast_tsv_merge(fts, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="rank_fraction"):
        tsv_fast.fast_tsv_merge(fts, rank_fraction=1.5)


def test_single_task_returns_its_task_vector():
    deltas = task_matrices((30, 18), 1, seed=3)
    got = tsv_fast.fast_tsv_merge([{"w": deltas[0]}], compute_dtype=torch.float64)
    assert_rel_close("T=1", got["w"], deltas[0], 1e-12)


def test_zero_rank_layers_warn_once_and_match_the_authors():
    tvs = [{"tiny.w": torch.randn(3, 50, dtype=torch.float64), "big.w": torch.randn(40, 30, dtype=torch.float64)}
           for _ in range(4)]  # min(3, 50) = 3 < T = 4, so k = 0
    with pytest.warns(UserWarning, match=r"1 matrix layer\(s\).*k = 0.*tiny.w") as record:
        got = tsv_fast.fast_tsv_merge(tvs, compute_dtype=torch.float64)
    assert len([w for w in record if "k = 0" in str(w.message)]) == 1
    assert torch.equal(got["tiny.w"], torch.zeros(3, 50, dtype=torch.float64))
    authors = reference.authors_fast_tsv_merge(tvs, compute_dtype=torch.float64)
    assert float(authors["tiny.w"].abs().max()) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = tsv_fast.fast_tsv_merge(tvs, compute_dtype=torch.float64, min_rank=1)
    want = reference.fast_tsv_merge(tvs, compute_dtype=torch.float64, min_rank=1)
    assert float(kept["tiny.w"].abs().max()) > 0
    assert_rel_close("min_rank=1", kept["tiny.w"], want["tiny.w"], FLOAT64_BOUND)


def test_identical_finetunes_give_that_task():
    delta = task_matrices((40, 24), 1, seed=4)[0]
    for num_tasks in (2, 5):
        got = tsv_fast.fast_tsv_merge([{"w": delta.clone()} for _ in range(num_tasks)], compute_dtype=torch.float64)
        want = reference.fast_tsv_merge([{"w": delta.clone()} for _ in range(num_tasks)], compute_dtype=torch.float64)
        k = 24 // num_tasks
        u, s, vh = torch.linalg.svd(delta)
        assert_rel_close(f"T={num_tasks} vs reference", got["w"], want["w"], FLOAT64_BOUND)
        assert_rel_close(f"T={num_tasks} vs top-k of the task", got["w"], (u[:, :k] * s[:k]) @ vh[:k], 1e-10)
        got32 = tsv_fast.fast_tsv_merge([{"w": delta.float()} for _ in range(num_tasks)])
        assert_rel_close(f"T={num_tasks} float32", got32["w"], want["w"], 1e-5)


def test_rank_deficient_and_zero_task_matrices_are_finite_and_match_reference():
    low = task_matrices((36, 30), 3, rank=2, seed=5)  # rank 2 < k = 10
    tvs = [{"w": low[0]}, {"w": low[1]}, {"w": torch.zeros(36, 30, dtype=torch.float64)}]
    got = tsv_fast.fast_tsv_merge(tvs, compute_dtype=torch.float64)
    want = reference.fast_tsv_merge(tvs, compute_dtype=torch.float64)
    assert_rel_close("rank-deficient", got["w"], want["w"], FLOAT64_BOUND)
    assert int(torch.linalg.matrix_rank(got["w"])) == 4  # two rank-2 tasks, nothing invented


def test_all_zero_layer_skips_factor_work_and_keeps_pretrained():
    pre, fts = make_models()
    for ft in fts:
        ft["layer.0.w"] = pre["layer.0.w"].clone()
    merged, report = tsv_fast.tsv_merge(pre, fts, return_report=True)
    assert torch.equal(merged["layer.0.w"], pre["layer.0.w"])
    assert report.zero_delta == ["layer.0.w"]
    merged_tv = tsv_fast.fast_tsv_merge([{"w": torch.zeros(5, 4)}] * 3)
    assert torch.equal(merged_tv["w"], torch.zeros(5, 4))


def test_excluded_and_non_matrix_keys_are_averaged_and_buffers_pass_through():
    pre, fts = make_models()
    pre["text_projection"] = torch.randn(8, 6)
    pre["counter"] = torch.tensor(7)
    for i, ft in enumerate(fts):
        ft["text_projection"] = pre["text_projection"] + i
        ft["counter"] = torch.tensor(7)
    merged = tsv_fast.tsv_merge(pre, fts, alpha=0.5)
    assert_rel_close("text_projection", merged["text_projection"], pre["text_projection"] + 0.5, 1e-6)
    mean_b = torch.stack([ft["layer.0.b"] for ft in fts]).mean(0)
    assert_rel_close("bias", merged["layer.0.b"], pre["layer.0.b"] + 0.5 * (mean_b - pre["layer.0.b"]), 1e-6)
    assert merged["counter"].dtype == torch.int64 and int(merged["counter"]) == 7


def test_mixed_dtypes_warn_and_keep_the_pretrained_dtype():
    pre, fts = make_models()
    fts[0] = {k: v.bfloat16() for k, v in fts[0].items()}
    with pytest.warns(UserWarning, match="different dtypes"):
        merged = tsv_fast.tsv_merge(pre, fts)
    assert merged["layer.0.w"].dtype == torch.float32


def test_rank_overrides_per_layer():
    tvs = [{"a.w": d} for d in task_matrices((30, 20), 2, seed=9)]
    got = tsv_fast.fast_tsv_merge(tvs, compute_dtype=torch.float64, rank_overrides={"a.*": 3})
    want = reference.fast_tsv_merge(tvs, compute_dtype=torch.float64, rank_fraction=3 / 20)
    assert_rel_close("override k=3", got["a.w"], want["a.w"], FLOAT64_BOUND)
    assert torch.linalg.matrix_rank(got["a.w"]) == 6


def test_zero_layers_and_errors_through_the_read_ahead_and_task_batches():
    from tsv_fast import Options, tsv_merge
    from tsv_fast.io.checkpoint import DictCheckpoint

    pre, fts = make_models(num_tasks=4, shape=(24, 16))
    pre["frozen.w"] = torch.randn(24, 16)
    for ft in fts:
        ft["frozen.w"] = pre["frozen.w"].clone()
    per_matrix = 24 * 16 * 8 * 3
    for budget in (per_matrix, 1 << 30):  # one task at a time, or everything in one chunk
        options = Options(max_chunk_bytes=budget)
        merged, report = tsv_merge(DictCheckpoint(pre), [DictCheckpoint(ft) for ft in fts], options=options,
                                   return_report=True)
        assert report.zero_delta == ["frozen.w"]
        assert torch.equal(merged["frozen.w"], pre["frozen.w"])
        want = reference.tsv_merge(pre, fts)
        assert_rel_close(f"budget {budget}", merged["layer.0.w"], want["layer.0.w"], 1e-5)
    fts[3]["frozen.w"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'frozen.w' of fine-tuned checkpoint 3 contains NaN"):
        tsv_fast.tsv_merge(pre, fts)


@pytest.mark.parametrize("route", ["reference", "exact"])
def test_identical_finetunes_in_float32_merge_to_that_task(route):
    """Two identical fine-tunes stack duplicate singular vectors; in float32 the stack's 'zero'
    singular values are rounding noise (~1e-7), so the numerical range must be judged at float32
    precision. (A float64-sized threshold kept that noise: 11 % off at 256×128.)"""
    delta = task_matrices((256, 128), 1, seed=3, dtype=torch.float32)[0]
    tvs = [{"w": delta}, {"w": delta.clone()}]
    u, s, v = reference.topk_svd_ref(delta.double(), 64)
    got = reference.fast_tsv_merge(tvs)["w"] if route == "reference" else tsv_fast.fast_tsv_merge(tvs, exact=True)["w"]
    assert_rel_close(f"{route}: identical float32 fine-tunes", got, (u * s) @ v.mT, 1e-4)


# ------------------------------------------------------------------------------------------------
# Keys present in some checkpoints only (Options.missing_keys)
# ------------------------------------------------------------------------------------------------
def test_a_buffer_only_the_base_has_comes_from_it_with_a_warning():
    """The old `embeddings.position_ids` (int64) saved in a base but not in today's fine-tunes."""
    pre, fts = make_models()
    want = tsv_fast.tsv_merge(pre, fts)
    pre["embeddings.position_ids"] = torch.arange(12).unsqueeze(0)
    with pytest.warns(UserWarning, match=r"come from the pretrained checkpoint: \['embeddings.position_ids'\]"):
        merged = tsv_fast.tsv_merge(pre, fts)
    assert torch.equal(merged["embeddings.position_ids"], pre["embeddings.position_ids"])
    assert all(torch.equal(merged[k], v) for k, v in want.items())
    with pytest.raises(ValueError, match=r"checkpoint 0 .*missing keys \['embeddings.position_ids'\]"):
        tsv_fast.tsv_merge(pre, fts, missing_keys="error")


def test_ignorable_keys_only_the_finetunes_have_are_left_out():
    pre, fts = make_models()
    want = tsv_fast.tsv_merge(pre, fts)
    for ft in fts:  # float buffers transformers drops for every model (old LLaMA checkpoints)
        ft["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    with pytest.warns(UserWarning, match=r"left out of the output: \['model.layers.0.self_attn.rotary_emb.inv_freq'\]"):
        merged = tsv_fast.tsv_merge(pre, fts)
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], v) for k, v in want.items())


@pytest.mark.hf
def test_the_ignore_patterns_of_the_model_class_come_from_transformers(tmp_path):
    """GPT-2's `attn.bias` (a float mask buffer older checkpoints saved) is ignorable because
    transformers' GPT2LMHeadModel lists it; without the folder's config.json it is an ordinary
    float key, and a fine-tune that lacks it is refused."""
    need("transformers")
    from safetensors.torch import save_file

    pre, fts = make_models()
    pre["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 4, 4))
    paths = []
    for i, sd in enumerate([pre, *fts]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file(sd, str(folder / "model.safetensors"))
        paths.append(folder)
    with pytest.raises(ValueError, match=r"missing keys \['h.0.attn.bias'\].*--missing-keys zero"):
        tsv_fast.tsv_merge(paths[0], paths[1:])
    (paths[0] / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.warns(UserWarning, match=r"h.0.attn.bias"):
        merged = tsv_fast.tsv_merge(paths[0], paths[1:])
    assert torch.equal(merged["h.0.attn.bias"], pre["h.0.attn.bias"])


def test_missing_keys_zero_counts_a_missing_key_as_a_zero_task_vector():
    pre, fts = make_models()
    del fts[1]["layer.0.b"]
    filled = [dict(ft) for ft in fts]
    filled[1]["layer.0.b"] = pre["layer.0.b"].clone()  # what "zero task vector" means
    with pytest.warns(UserWarning, match=r"zero task vectors: .*lacks \['layer.0.b'\]"):
        merged = tsv_fast.tsv_merge(pre, fts, missing_keys="zero")
    want = tsv_fast.tsv_merge(pre, filled)
    assert all(torch.equal(merged[k], v) for k, v in want.items())
    fts[2]["extra.w"] = torch.randn(3, 3)  # a key the base lacks has no pretrained value: refused still
    with pytest.raises(ValueError, match=r"checkpoint 2 .*unexpected keys \['extra.w'\]"):
        tsv_fast.tsv_merge(pre, fts, missing_keys="zero")
    with pytest.raises(ValueError, match="missing_keys must be one of base, zero, error"):
        tsv_fast.tsv_merge(pre, fts, missing_keys="ignore")


def test_out_dtype_rounds_once_to_the_asked_dtype():
    """float64 outputs of float32 inputs keep the float64 computation's digits (the engine rounds
    once, to the output dtype, instead of to the input's and then casting)."""
    pre, fts = make_models()
    double = lambda sd: {k: v.double() for k, v in sd.items()}  # noqa: E731
    want = reference.tsv_merge(double(pre), [double(ft) for ft in fts], compute_dtype=torch.float64)
    for exact in (False, True):
        got = tsv_fast.tsv_merge(pre, fts, compute_dtype=torch.float64, out_dtype=torch.float64, exact=exact)
        assert all(v.dtype == torch.float64 for v in got.values())
        for key in want:  # a float32 rounding on the way would be ~1e-8 here
            assert_rel_close(key, got[key], want[key], 1e-12)
    assert tsv_fast.tsv_merge(pre, fts, out_dtype="bfloat16")["layer.0.b"].dtype == torch.bfloat16
