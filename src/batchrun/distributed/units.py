"""Cuts a plan into units of work for many workers, estimates their cost and models the dynamic-pull schedule.

A unit is a contiguous range of the plan's order: whole prefix groups packed together, or, for a group too big
for one worker's KV budget and for one unit, a wave of it. Pure numpy: no torch, no ray.
"""
# Unit sizes follow guided self-scheduling (Polychronopoulos and Kuck, 1987), made static: each unit takes at
# most 1 / (GUIDED_SHARE * workers) of the cost not yet cut, and never less than the total's
# 1 / (workers * TAIL_UNITS_PER_WORKER). Dispatched largest first, the big units go out early (few prefix
# recomputations, long full batches) and the small ones last, to even out the finish times: the pull schedule
# ends within about one tail unit, 1 / TAIL_UNITS_PER_WORKER of a worker's share, of the mean. Nor is a unit
# cut below one KV budget (a full batch), unless that would leave a worker without work: a small job is cut
# into one unit per worker, each run as one batch.

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from batchrun.kv_accounting import KVAccounting, RangeCost
from batchrun.planner import PlanLayout

GUIDED_SHARE = 2
TAIL_UNITS_PER_WORKER = 32


@dataclass(frozen=True)
class UnitConfig:
    """How finely a plan is cut (see `unit_config`). A unit stops growing at its target cost; a group is split
    only when it exceeds both the target and the KV budget."""

    kv_budget_tokens: int  # one worker's KV budget, in tokens (the plan's budget / KV bytes per token)
    min_cost: int  # the smallest target
    max_share: float = 0.0  # the target is this share of the cost not yet cut, when above min_cost

    def __post_init__(self) -> None:
        assert self.kv_budget_tokens >= 1 and self.min_cost >= 1 and 0.0 <= self.max_share <= 1.0, self

    def target(self, remaining: int) -> int:
        return max(self.min_cost, int(remaining * self.max_share))


class WorkUnits(NamedTuple):
    """Units as ranges of the plan's `order`, in plan order: unit u runs order[start[u]:end[u]]."""

    start: np.ndarray  # int64 [U]
    end: np.ndarray  # int64 [U]; start[u + 1] == end[u]: the units partition the order
    prefill_tokens: np.ndarray  # int64 [U]; each shared segment the unit reads once, plus own prompt tokens
    decode_tokens: np.ndarray  # int64 [U]; sum of max_tokens
    is_wave: np.ndarray  # bool [U]; part of a split group: its group's top segments are computed again

    @property
    def cost(self) -> np.ndarray:
        """int64 [U]: prefill plus decode tokens (also the KV tokens the unit holds if all of it ran at once)."""
        return self.prefill_tokens + self.decode_tokens

    def __len__(self) -> int:
        return len(self.start)


def unit_config(layout: PlanLayout, *, max_tokens: np.ndarray, kv_budget_tokens: int, num_workers: int,
                tail_units_per_worker: int = TAIL_UNITS_PER_WORKER) -> UnitConfig:
    """Guided unit sizes for `num_workers` workers (the module's comment)."""
    assert num_workers >= 1 and tail_units_per_worker >= 1
    total = int(layout.prefill_tokens + np.asarray(max_tokens, np.int64).sum())
    full_batch = min(kv_budget_tokens, -(-total // num_workers))
    min_cost = max(1, full_batch, -(-total // (num_workers * tail_units_per_worker)))
    return UnitConfig(kv_budget_tokens=kv_budget_tokens, min_cost=min_cost,
                      max_share=1 / (GUIDED_SHARE * num_workers))


def make_units(layout: PlanLayout, *, prompt_len: np.ndarray, max_tokens: np.ndarray,
               config: UnitConfig) -> WorkUnits:
    """Cuts the order into units (see the module docstring), in plan order.

    Consecutive groups are packed until a unit reaches its target (`UnitConfig.target` of the cost not cut
    before it). A group whose cost exceeds both the target and the KV budget is split: its items (child nodes
    and the requests reading it directly) are packed into waves of up to that larger bound (one worker would
    run it in waves of the budget anyway, keeping the prefix resident: each wave on another worker computes
    the prefix again, so waves are never smaller), and a child that is itself too big is split in turn. So a
    node is computed by several workers only when it or an ancestor was split, and only the segments above
    the split are repeated (never a sibling's).
    """
    costs = KVAccounting(layout.forest, prompt_len=prompt_len, max_tokens=max_tokens).ranges(layout.order)
    child_at = [row.tolist() for row in layout.forest.request_chains(layout.order).T]
    cutter = _Cutter(costs, child_at, config)
    if len(layout.order):
        cutter.cut(0, len(layout.order), 0)
    ranges = cutter.out
    start = np.array([r[0] for r in ranges], np.int64)
    end = np.array([r[1] for r in ranges], np.int64)
    prefill = np.array([costs.prefill(s, e) for s, e, _ in ranges], np.int64)
    decode = np.array([costs.decode(s, e) for s, e, _ in ranges], np.int64)
    return WorkUnits(start, end, prefill, decode, np.array([r[2] for r in ranges], bool))


class _Cutter:
    """make_units' walk: spans are cut in plan order, so the cost not yet cut sets each unit's target."""

    def __init__(self, costs: RangeCost, child_at: list[list[int]], config: UnitConfig) -> None:
        # child_at[d][p]: the node at depth d of the chain of the request at position p, or -1.
        self.costs, self.child_at, self.config = costs, child_at, config
        self.span_end = costs.span.end.tolist()
        self.remaining = costs.cost(0, len(costs)) if len(costs) else 0
        self.out: list[tuple[int, int, bool]] = []  # (start, end, is_wave)

    def cut(self, a: int, b: int, depth: int) -> None:
        """Cuts span [a, b): the whole order at depth 0 (its items are the groups), else one split node's
        members."""
        costs, budget = self.costs, self.config.kv_budget_tokens
        pack_start = -1
        for s, e, is_node in _items(self.child_at, self.span_end, a, b, depth):
            target = self.config.target(self.remaining)
            if is_node and costs.cost(s, e) > max(target, budget):
                if pack_start >= 0:
                    self._emit(pack_start, s, depth > 0)
                    pack_start = -1
                self.cut(s, e, depth + 1)
                continue
            limit = target if depth == 0 else max(target, budget)
            if pack_start >= 0 and costs.cost(pack_start, e) > limit:
                self._emit(pack_start, s, depth > 0)
                pack_start = -1
            if pack_start < 0:
                pack_start = s
        if pack_start >= 0:
            self._emit(pack_start, b, depth > 0)

    def _emit(self, start: int, end: int, is_wave: bool) -> None:
        self.out.append((start, end, is_wave))
        self.remaining = max(0, self.remaining - self.costs.cost(start, end))


def _items(child_at: list[list[int]], span_end: list[int], a: int, b: int, depth: int
           ) -> list[tuple[int, int, bool]]:
    """The items of span [a, b) at `depth`: (start, end, is_node) for each child node's members and for each
    request that reads no node at that depth (a node's members end at span_end[node])."""
    row = child_at[depth] if depth < len(child_at) else None
    items = []
    p = a
    while p < b:
        node = row[p] if row is not None else -1
        if node < 0:
            items.append((p, p + 1, False))
            p += 1
        else:
            assert span_end[node] <= b, "a node's members must be contiguous"
            items.append((p, span_end[node], True))
            p = span_end[node]
    return items


def dispatch_order(units: WorkUnits) -> np.ndarray:
    """int64 [U]: units by estimated cost, largest first (ties in plan order): the longest-first rule keeps
    the pull schedule's finish times even."""
    return np.lexsort((np.arange(len(units)), -units.cost)).astype(np.int64)


def simulate_pull(costs: np.ndarray, *, num_workers: int) -> np.ndarray:
    """float64 [num_workers]: each worker's total cost when units, in the given order, go one at a time to
    the worker that frees up first (the driver's dynamic pull, with cost standing for time)."""
    assert num_workers >= 1
    load = np.zeros(num_workers, np.float64)
    free_at = [(0.0, w) for w in range(num_workers)]
    for c in np.asarray(costs, np.float64).tolist():
        t, w = heapq.heappop(free_at)
        load[w] += c
        heapq.heappush(free_at, (t + c, w))
    return load


def load_balance(load: np.ndarray) -> float:
    """max / mean of the workers' loads: 1.0 is perfect."""
    mean = float(np.mean(load))
    return float(np.max(load)) / mean if mean > 0 else 1.0
