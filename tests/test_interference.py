"""STI (Eq. 7) per layer and per block against the reference."""
import torch

import tsv_fast
from tsv_fast import reference
from tsv_fast.synthetic import task_matrices


def task_vectors(shared, num_tasks=4):
    mats = task_matrices((48, 32), num_tasks, shared=shared, seed=3)
    wide = task_matrices((16, 40), num_tasks, shared=shared, seed=4)
    return [{"enc.blocks.0.w": mats[i], "enc.blocks.1.w": wide[i], "enc.blocks.1.b": torch.ones(16)}
            for i in range(num_tasks)]


def test_sti_matches_reference_and_grows_with_sharing():
    values = []
    for shared in (0.0, 0.5, 0.9):
        tvs = task_vectors(shared)
        got = tsv_fast.interference(None, tvs)
        exact = tsv_fast.interference(None, tvs, exact=True)
        want = reference.interference(tvs)
        assert list(got) == list(exact) == ["enc.blocks.0.w", "enc.blocks.1.w"]
        for key in want:
            assert abs(got[key] - want[key]) <= 1e-8 * want[key], (key, got[key], want[key])
            assert abs(exact[key] - want[key]) <= 1e-12 * want[key], (key, exact[key], want[key])
        values.append(got["enc.blocks.0.w"])
    assert values[0] < values[1] < values[2]


def test_sti_is_zero_for_orthogonal_tasks_and_after_orthogonalisation():
    q = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))[0]
    p = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))[0]
    tvs = [{"w": (q[:, 10 * i:10 * i + 10] * torch.linspace(2, 1, 10, dtype=torch.float64)) @ p[:, 10 * i:10 * i + 10].mT}
           for i in range(3)]
    assert tsv_fast.interference(None, tvs)["w"] < 1e-12
    tvs = task_vectors(0.9)
    after = tsv_fast.interference(None, tvs, orthogonalized=True)
    before = tsv_fast.interference(None, tvs)
    want_after = reference.interference(tvs, orthogonalized=True)
    for key in before:
        assert after[key] < 1e-9 * before[key]
        assert want_after[key] < 1e-9 * before[key]


def test_sti_from_pretrained_and_finetuned_and_per_block():
    tvs = task_vectors(0.5)
    pre = {k: torch.randn(v.shape, dtype=v.dtype) for k, v in tvs[0].items()}
    fts = [{k: pre[k] + tv[k] for k in pre} for tv in tvs]
    per_layer = tsv_fast.interference(pre, fts)
    want = reference.interference(tvs)
    for key in want:
        assert abs(per_layer[key] - want[key]) <= 1e-7 * want[key]
    blocks = tsv_fast.per_block(per_layer)
    assert blocks == {"enc.blocks.0": per_layer["enc.blocks.0.w"], "enc.blocks.1": per_layer["enc.blocks.1.w"]}
