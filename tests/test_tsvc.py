"""TSV-C: compress / reconstruct against the reference, and exact storage accounting."""
import pytest
import torch

import tsv_fast
from tsv_fast import reference
from tsv_fast.synthetic import task_matrices
from tsv_fast.testing import assert_rel_close


def models(num_tasks, dtype=torch.float64):
    generator = torch.Generator().manual_seed(11)
    pre = {"blk.0.w": torch.randn(40, 26, generator=generator, dtype=dtype),
           "blk.0.wide": torch.randn(9, 31, generator=generator, dtype=dtype),
           "blk.0.b": torch.randn(26, generator=generator, dtype=dtype)}
    tall = task_matrices((40, 26), num_tasks, shared=0.5, seed=1, dtype=dtype)
    wide = task_matrices((9, 31), num_tasks, shared=0.5, seed=2, dtype=dtype)
    fts = [{"blk.0.w": pre["blk.0.w"] + tall[i], "blk.0.wide": pre["blk.0.wide"] + wide[i],
            "blk.0.b": pre["blk.0.b"] + i} for i in range(num_tasks)]
    return pre, fts


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("num_tasks", [1, 3, 4])
def test_reconstruct_matches_reference(num_tasks, exact):
    pre, fts = models(num_tasks)
    packed = tsv_fast.compress(pre, fts, compute_dtype=torch.float64, storage_dtype=torch.float64, exact=exact)
    ref = reference.compress(pre, fts, compute_dtype=torch.float64)
    for task in range(num_tasks):
        got = packed.reconstruct(task, pre)
        want = reference.reconstruct(pre, ref[task])
        for key in pre:
            assert got[key].dtype == pre[key].dtype
            assert_rel_close(f"task {task} {key}", got[key] - pre[key], want[key] - pre[key], 1e-8)
        # singular values and projectors, independent of sign and basis
        u, s, v = packed.factors["blk.0.w"]
        ru, rs, rv = ref[task]["blk.0.w"]
        assert_rel_close("sigma", s[task], rs, 1e-10)
        assert_rel_close("U projector", u[task] @ u[task].mT, ru @ ru.mT, 1e-8)
        assert_rel_close("V projector", v[task] @ v[task].mT, rv @ rv.mT, 1e-8)
    if num_tasks == 1:  # k = r: lossless
        for key in pre:
            assert_rel_close(key, packed.reconstruct(0, pre)[key], fts[0][key], 1e-10)


def test_storage_accounting_is_exact():
    pre, fts = models(4)
    packed = tsv_fast.compress(pre, fts)
    k_tall, k_wide = 26 // 4, 9 // 4
    stored = 4 * (k_tall * (40 + 26 + 1) + k_wide * (9 + 31 + 1) + 26)
    dense = 4 * (40 * 26 + 9 * 31 + 26)
    assert packed.storage() == {"stored_numbers": stored, "dense_numbers": dense, "ratio": stored / dense}


def test_task_vector_without_pretrained_and_bad_index():
    pre, fts = models(3)
    packed = tsv_fast.compress(None, [{k: ft[k] - pre[k] for k in pre} for ft in fts])
    assert set(packed.task_vector(2)) == set(pre)
    with pytest.raises(IndexError, match="task 3 out of range"):
        packed.task_vector(3)
