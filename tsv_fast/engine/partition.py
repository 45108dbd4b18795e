"""A plan split over N ranks (torchrun) or N independent parts (``--shard i/N``).

Every key of the plan goes to exactly one part, with all T of its task matrices (a layer's tasks stay
together: its factor work needs all of them). Keys are assigned by estimated cost, largest first, each
to the part with the least cost so far (LPT: at most 4/3 of the best possible maximum). The estimate,
in seconds at nominal rates (``RATES``, measured on one core of the CI machine: only their ratios
matter for the balance), is the route's FLOPs per matrix plus the bytes read and written:

* a matrix of the float64 Gram route (every factored method; m >= n after transposing, K = Σ widths):
  per dense task 2mn² (task Gram) + 9n³ (eigensolver) + 2mnk (ΔV), per LoRA task of rank r
  4(m + n)r² + 22r³ (QR of both sides, SVD of the core); then 4(m + n)K² + 18K³ (stack Grams, their
  eigensolvers, the G^-1/2 products) in float64 and 2mnK (reconstruction) in float32; the full-SVD
  route (``exact``) counts 4mn² + 22n³ per task instead of the Gram and eigensolver
  (bench/bench_merge.py ``route_flops`` counts the same for the Gram route);
* bytes: the base, every dense task's tensor (a LoRA task's factors) and the output;
* keys combined elementwise or passed through: their bytes only.

The assignment depends on the layout, the options and the inputs' kinds only (never on timings), so
every rank, and every job of a ``--shard`` array, computes the same one.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..options import Options
from .plan import Group, Plan


@dataclass(frozen=True)
class Rates:
    """Nominal rates of the cost model: float64 and float32 FLOP/s, bytes/s."""

    fp64: float = 41.5e9   # bench/results/merge_cpu_20261122_vitb32-block0.json: GEMM rate, one thread
    fp32: float = 69.1e9
    bandwidth: float = 9.7e9


RATES = Rates()


class Stopped(RuntimeError):
    """Another rank of a distributed run failed: this one stops without finishing its part."""


def matrix_flops(shape: Sequence[int], k: int, tasks: Sequence[int | None], *, exact: bool = False
                 ) -> tuple[float, float]:
    """(float64, float32) FLOPs of one matrix; ``tasks``: per task None (a dense task matrix), the
    rank r of its LoRA factors, or 0 (the task leaves it alone)."""
    m, n = max(shape), min(shape)
    fp64, width = 0.0, 0
    for r in tasks:
        if r is None:
            fp64 += 4 * m * n * n + 22 * n ** 3 if exact else 2 * m * n * n + 9 * n ** 3 + 2 * m * n * k
            width += k
        elif r > 0:
            fp64 += 4 * (m + n) * r * r + 22 * r ** 3
            width += min(k, r)
    fp64 += 4 * (m + n) * width ** 2 + 18 * width ** 3
    return fp64, 2.0 * m * n * width


def key_costs(plan: Plan, source, options: Options, rates: Rates = RATES) -> dict[str, float]:
    """Estimated seconds per key of ``plan`` (see the module docstring), in plan order."""
    reference, num_tasks = source.reference, source.num_tasks
    adapters = getattr(source, "adapters", None)  # engine.adapters.AdapterTasks: LoRA factors

    def nbytes(key: str) -> int:
        return math.prod(reference.shape(key)) * reference.dtype(key).itemsize

    costs: dict[str, float] = {}
    for key in plan.elementwise:
        costs[key] = (num_tasks + 2) * nbytes(key) / rates.bandwidth
    for key in [*plan.unchanged, *plan.zero_rank]:
        costs[key] = 2 * nbytes(key) / rates.bandwidth
    for group in plan.groups:
        m, n = group.shape
        for key in group.keys:
            if adapters is None:
                tasks, read = [None] * num_tasks, (num_tasks + 1) * nbytes(key)
            else:
                tasks = [task.factors[key].rank if key in task.factors else None if key in task.full else 0
                         for task in adapters]
                read = nbytes(key) * (1 + tasks.count(None)) + sum(
                    r * (m + n) * reference.dtype(key).itemsize for r in tasks if r)
            fp64, fp32 = matrix_flops(group.shape, group.rank, tasks, exact=options.exact)
            costs[key] = fp64 / rates.fp64 + fp32 / rates.fp32 + (read + nbytes(key)) / rates.bandwidth
    return costs


def assign(costs: dict[str, float], count: int) -> dict[str, int]:
    """key -> part: largest cost first, each to the least-loaded part (ties: plan order, lowest part)."""
    loads = [(0.0, part) for part in range(count)]
    assignment = {}
    for key in sorted(costs, key=lambda key: -costs[key]):  # a stable sort: ties keep plan order
        load, part = heapq.heappop(loads)
        assignment[key] = part
        heapq.heappush(loads, (load + costs[key], part))
    return assignment


@dataclass
class Part:
    """Part ``index`` (0-based) of ``count``: a rank of a distributed run or one job of a ``--shard``
    array. ``select`` gives its plan and records the whole assignment; ``check`` raises ``Stopped``
    once ``stop()`` says another rank failed."""

    index: int
    count: int
    stop: Callable[[], bool] | None = None
    assignment: dict[str, int] = field(default_factory=dict)   # key -> part, set by select
    costs: dict[str, float] = field(default_factory=dict)      # key -> estimated seconds
    order: list[str] = field(default_factory=list)             # every key, in the plan's order

    def __post_init__(self) -> None:
        if not (isinstance(self.index, int) and isinstance(self.count, int) and 0 <= self.index < self.count):
            raise ValueError(f"part {self.index} of {self.count}: need 0 <= i < N (parts are numbered from 0)")

    @classmethod
    def parse(cls, text: str) -> Part:
        """'2/8' -> part 2 of 8."""
        index, _, count = text.partition("/")
        try:
            index, count = int(index), int(count)
        except ValueError:
            raise ValueError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/8 ... 7/8") from None
        return cls(index, count)

    def select(self, plan: Plan, source, method, options: Options) -> Plan:
        """This part's share of ``plan``: same groups (same order), only its keys."""
        self.costs = key_costs(plan, source, options)
        self.assignment = assign(self.costs, self.count)
        self.order = [*plan.elementwise, *plan.unchanged, *plan.zero_rank, *(k for g in plan.groups for k in g.keys)]
        mine = [key for key in self.order if self.assignment[key] == self.index]
        return plan_of(plan, set(mine))

    def loads(self) -> list[float]:
        """Estimated seconds of every part under the assignment."""
        loads = [0.0] * self.count
        for key, part in self.assignment.items():
            loads[part] += self.costs[key]
        return loads

    def check(self) -> None:
        if self.stop is not None and self.stop():
            raise Stopped("stopped: another rank failed")


def plan_of(plan: Plan, keys: set[str]) -> Plan:
    """``plan`` restricted to ``keys`` (empty groups dropped)."""
    groups = [Group(g.shape, g.rank, g.out_dtype, tuple(k for k in g.keys if k in keys)) for g in plan.groups]
    return Plan(plan.num_tasks, [g for g in groups if g.keys], [k for k in plan.elementwise if k in keys],
                [k for k in plan.unchanged if k in keys], [k for k in plan.zero_rank if k in keys])


def balance(loads: Sequence[float]) -> float:
    """max / mean of the parts' loads (1 is perfect)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0
