"""The plan split over N parts (engine.partition) and the pieces a distributed run is made of, in
one process: every key in exactly one part, cost-balanced, a part reading and holding only its keys
within the chunk budget, the exactly-once check before a commit, the stop request, a joined staging
folder, and the options that make a --shard plan. The ranks themselves: test_distributed.py."""
from __future__ import annotations

import math

import pytest
import torch

from tsv_fast import synthetic
from tsv_fast.cli.ranks import plan_options
from tsv_fast.engine.distributed import every_key_once
from tsv_fast.engine.partition import Part, Stopped, assign, balance, key_costs
from tsv_fast.engine.plan import make_plan
from tsv_fast.engine.run import run
from tsv_fast.engine.sources import DenseTasks
from tsv_fast.io.checkpoint import DictCheckpoint, DictSink
from tsv_fast.io.outputs import Output
from tsv_fast.io.sink import Staged
from tsv_fast.methods import get_method
from tsv_fast.options import Options


def layout_source(name: str, tasks: int = 8, dtype=torch.float32) -> DenseTasks:
    ref = synthetic.LayoutCheckpoint(name, dtype)
    return DenseTasks(ref, [ref] * tasks)


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_every_key_goes_to_exactly_one_part_and_the_parts_balance(count):
    source, options = layout_source("vit-b-32"), Options()
    plan = make_plan(source, get_method("tsv-m"), options)
    parts = [Part(i, count) for i in range(count)]
    plans = [part.select(plan, source, None, options) for part in parts]
    keys = [k for p in plans for k in [*p.elementwise, *p.unchanged, *p.zero_rank, *(k for g in p.groups for k in g.keys)]]
    assert sorted(keys) == sorted(source.reference.keys())  # every key once: none lost, none twice
    assert all(part.assignment == parts[0].assignment for part in parts)  # every part computes the same split
    for index, p in enumerate(plans):  # groups keep their order, shape and rank; only keys go
        want = [tuple(k for k in g.keys if parts[0].assignment[k] == index) for g in plan.groups]
        assert [g.keys for g in p.groups] == [keys for keys in want if keys]
        assert all((g.shape, g.rank) == (plan.groups[[h.shape for h in plan.groups].index(g.shape)].shape,
                                         plan.groups[[h.shape for h in plan.groups].index(g.shape)].rank)
                   for g in p.groups)
    loads = parts[0].loads()
    # LPT: no part exceeds the mean by more than the largest key's cost
    assert max(loads) <= sum(loads) / count + max(parts[0].costs.values()) + 1e-9
    assert balance(loads) < 1.05


def test_costs_follow_the_route_flops_and_bytes():
    source, options = layout_source("vit-b-32"), Options()
    plan = make_plan(source, get_method("tsv-m"), options)
    costs = key_costs(plan, source, options)
    c_fc, out_proj = (costs[f"visual.transformer.resblocks.0.{k}"] for k in ("mlp.c_fc.weight", "attn.out_proj.weight"))
    assert c_fc > out_proj > costs["visual.ln_pre.weight"] > 0  # 3072x768 > 768x768 matrices > a vector
    exact = key_costs(plan, source, Options(exact=True))
    assert exact["visual.transformer.resblocks.0.mlp.c_fc.weight"] > c_fc  # full SVDs cost more
    assert assign({"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}, 2) == {"a": 0, "b": 1, "c": 1, "d": 0}


class Recording(DictCheckpoint):
    def __init__(self, tensors, name, loaded: set):
        super().__init__(tensors, name)
        self.loaded = loaded

    def load(self, key):
        self.loaded.add(key)
        return super().load(key)


def test_a_part_reads_and_writes_only_its_keys():
    pre, fts = synthetic.checkpoints("tiny-vit", 3)
    loaded: set[str] = set()
    source = DenseTasks(Recording(pre, "pre", loaded), [Recording(ft, f"ft{i}", loaded) for i, ft in enumerate(fts)])
    part = Part(1, 2)
    result, _ = run(source, get_method("tsv-m"), Options(), DictSink(), part=part)
    mine = {key for key, index in part.assignment.items() if index == 1}
    assert mine and set(result) == mine and loaded <= mine


def test_a_part_holds_at_most_its_chunk_budget(monkeypatch):
    """A part loads chunks of exactly its own matrices, each within the memory budget (the float64
    working set of L layers x T tasks, as the engine budgets it)."""
    monkeypatch.setitem(synthetic.LAYOUTS, "_vit4", lambda: synthetic._vit_layout(64, 4, 4, 4, 32))  # 4 blocks
    pre, fts = synthetic.checkpoints("_vit4", 3)
    loads: list[tuple[tuple[str, ...], int, int]] = []
    original = DenseTasks._load

    def recording(self, job, device):
        tasks = max(t1 - t0 for t0, t1 in job.batches)  # a layer too large for the budget: tasks in batches
        per_matrix = math.prod(job.shape) * 8 * 3
        loads.append((job.keys, len(job.keys) * tasks * per_matrix, per_matrix))
        return original(self, job, device)

    monkeypatch.setattr(DenseTasks, "_load", recording)
    source = lambda: DenseTasks(DictCheckpoint(pre), [DictCheckpoint(ft) for ft in fts])  # noqa: E731
    budget = 2 * 3 * 64 * 64 * 8 * 3  # two 64 x 64 layers' T = 3 tasks; c_fc (256 x 64) in task batches
    part = Part(1, 2)
    run(source(), get_method("tsv-m"), Options(max_chunk_bytes=budget), DictSink(), part=part)
    mine = {key for key, index in part.assignment.items() if index == 1}
    assert {key for keys, _, _ in loads for key in keys} == {key for key in mine if pre[key].ndim == 2}
    # the budget, or one matrix where a single one exceeds it (c_fc: its tasks one at a time)
    assert all(size <= max(budget, one) for _, size, one in loads), (loads, budget)
    assert max(len(keys) for keys, _, _ in loads) > 1  # the budget lets some layers share a chunk


def test_a_key_written_twice_or_by_no_rank_is_never_committed():
    part = Part(0, 2, assignment={"a": 0, "b": 1, "c": 1})
    shards = [Staged("s0", ["a"], 4), Staged("s1", ["b", "c"], 8)]
    assert every_key_once(shards, part) == shards
    with pytest.raises(RuntimeError, match="'b' was written 2 times"):
        every_key_once([*shards, Staged("s2", ["b"], 4)], part)
    with pytest.raises(RuntimeError, match="'c' was written by no rank"):
        every_key_once([Staged("s0", ["a"], 4), Staged("s1", ["b"], 4)], part)
    with pytest.raises(RuntimeError, match="outside the plan"):
        every_key_once([*shards, Staged("s2", ["d"], 4)], part)


def test_a_stop_request_ends_the_run_before_the_next_chunk():
    pre, fts = synthetic.checkpoints("tiny-vit", 3)
    with pytest.raises(Stopped):
        run(DenseTasks(DictCheckpoint(pre), [DictCheckpoint(ft) for ft in fts]), get_method("tsv-m"), Options(),
            part=Part(0, 1, stop=lambda: True))
    with pytest.raises(ValueError, match="0 <= i < N"):
        Part.parse("2/2")
    with pytest.raises(ValueError, match="I/N"):
        Part.parse("half")


def test_a_joined_staging_folder_is_written_never_committed(tmp_path):
    owner = Output(tmp_path / "out")
    joined = Output.join(owner.staging, tmp_path / "out", folder=True)
    joined.member("x").write_text("x")
    with pytest.raises(RuntimeError, match="only the process that opened"):
        joined.commit()
    joined.abort()  # leaves the owner's folder alone
    assert (owner.staging / "x").is_file()
    owner.abort()
    assert not owner.staging.exists()
    with pytest.raises(ValueError, match="not visible here"):
        Output.join(tmp_path / "nowhere", tmp_path / "out", folder=True)


def test_every_option_that_changes_the_result_is_in_a_parts_plan():
    base = plan_options(Options(), get_method("tsv-m"))
    for change in ({"missing_keys": "zero"}, {"out_dtype": torch.bfloat16}, {"min_rank": 1}, {"exact": True},
                   {"rank_overrides": {"*.c_fc.*": 3}}, {"compute_dtype": torch.float64}):
        assert plan_options(Options(**change), get_method("tsv-m")) != base, change
    for change in ({"device": "cpu"}, {"backend": "torch"}, {"max_chunk_bytes": 1 << 20}, {"progress": True}):
        assert plan_options(Options(**change), get_method("tsv-m")) == base, change  # rounding at most
    assert plan_options(Options(), get_method("iso-cts", common_space_fraction=0.5)) != \
        plan_options(Options(), get_method("iso-cts"))
