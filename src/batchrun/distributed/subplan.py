"""A unit's own plan: the requests of one unit cut out of the whole plan, with its layout renumbered, so that a
worker runs it with the unchanged engine and receives only the token ids and records that the unit needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from batchrun.distributed.units import RangeCost
from batchrun.planner import PlanLayout
from batchrun.requests import Request
from batchrun.tokens import TokenTable


@dataclass(frozen=True)
class SubPlan:
    """What the engine reads of a plan (engine.PlanLike), for a subset of the plan's requests.

    Local request i is the whole plan's row `rows[i]`; the subset keeps the plan's order, so the members of
    every shared node stay contiguous and the engine runs them as the whole plan would.
    """

    rows: np.ndarray  # int64 [n]: plan rows, in plan order
    requests: list[Request]
    tokens: TokenTable
    layout: PlanLayout

    def __post_init__(self) -> None:
        assert len(self.rows) == len(self.requests) == len(self.tokens) == len(self.layout.order)


def slice_plan(*, requests: list[Request], tokens: TokenTable, layout: PlanLayout, rows: np.ndarray,
               kv_budget_tokens: int, kv_bytes_per_token: int) -> SubPlan:
    """The sub-plan of `rows` (plan rows in plan order: e.g. order[start:end] with done requests taken out).

    Nodes are those the rows read (whole chains), renumbered in their topological order; each node's
    `node_request` becomes a local member; batches are re-cut greedily under `kv_budget_tokens`.
    """
    rows = np.asarray(rows, np.int64)
    num = len(rows)
    prompt_len = tokens.lengths[rows].astype(np.int64)
    request_node = layout.request_node.astype(np.int64)[rows]
    node_parent = layout.node_parent.astype(np.int64)
    kept = _chains(node_parent, request_node)
    new_index = np.full(len(node_parent) + 1, -1, np.int64)  # the trailing entry maps -1 to -1
    new_index[kept] = np.arange(len(kept))
    local_node = new_index[request_node]
    node_request = np.full(len(kept), num, np.int64)  # the first local reader of each kept node
    node, local = local_node, np.arange(num)
    sub_parent = new_index[node_parent[kept]]
    while len(node):  # one step per level
        has = node >= 0
        node, local = node[has], local[has]
        np.minimum.at(node_request, node, local)
        node = np.append(sub_parent, -1)[node]
    node_len = layout.node_len.astype(np.int64)[kept]
    starts = tokens.indptr[rows]
    indptr = np.concatenate(([0], np.cumsum(prompt_len))).astype(np.int64)
    flat = tokens.tokens[_ranges(starts, prompt_len)] if num else tokens.tokens[:0]
    shared = np.append(node_len, 0)[local_node]
    segments = node_len - np.append(node_len, 0)[sub_parent]
    prefill = int(segments.sum() + (prompt_len - shared).sum())
    top = _top_level(sub_parent)
    group_key = np.append(top, -1)[local_node]
    is_start = np.ones(num, bool)
    is_start[1:] = (group_key[1:] < 0) | (group_key[1:] != group_key[:-1])
    i32 = lambda a: np.asarray(a, np.int64).astype(np.int32)
    sub = PlanLayout(
        node_parent=i32(sub_parent), node_len=i32(node_len), node_request=i32(node_request),
        request_node=i32(local_node), order=i32(np.arange(num)),
        group_indptr=i32(np.append(np.flatnonzero(is_start), num)), batch_indptr=i32([0, num] if num else [0]),
        prompt_tokens=int(prompt_len.sum()), prefill_tokens=prefill,
        saved_prefill_tokens=int(prompt_len.sum()) - prefill, num_groups=int(is_start.sum()),
        num_levels=_num_levels(sub_parent), num_shared_nodes=len(kept), num_batches=1 if num else 0,
        max_batch_kv_bytes=0,
    )
    max_tokens = np.array([requests[i].sampling.max_tokens for i in rows.tolist()], np.int64)
    sub = _with_batches(sub, prompt_len=prompt_len, max_tokens=max_tokens, budget=kv_budget_tokens,
                        kv_bytes_per_token=kv_bytes_per_token)
    return SubPlan(rows=rows, requests=[requests[i] for i in rows.tolist()],
                   tokens=TokenTable(flat, indptr), layout=sub)


def _with_batches(layout: PlanLayout, *, prompt_len: np.ndarray, max_tokens: np.ndarray, budget: int,
                  kv_bytes_per_token: int) -> PlanLayout:
    """The layout with greedy batches under `budget` KV tokens, counted as the planner counts them."""
    costs = RangeCost(layout, prompt_len=prompt_len, max_tokens=max_tokens)
    num = len(layout.order)
    bounds, max_kv = [0], 0
    while bounds[-1] < num:
        a = e = bounds[-1]
        while e < num and (e == a or costs.cost(a, e + 1) <= budget):
            e += 1
        max_kv = max(max_kv, costs.cost(a, e))
        bounds.append(e)
    return replace(layout, batch_indptr=np.asarray(bounds, np.int32), num_batches=len(bounds) - 1,
                   max_batch_kv_bytes=max_kv * kv_bytes_per_token)


def _chains(node_parent: np.ndarray, request_node: np.ndarray) -> np.ndarray:
    """Sorted node ids read by the requests: their nodes and all ancestors."""
    found = [np.unique(request_node[request_node >= 0])]
    while len(found[-1]):
        up = node_parent[found[-1]]
        found.append(np.unique(up[up >= 0]))
    return np.unique(np.concatenate(found)).astype(np.int64)


def _top_level(node_parent: np.ndarray) -> np.ndarray:
    top = np.arange(len(node_parent))
    for i, p in enumerate(node_parent.tolist()):  # topological: a parent's top is known first
        if p >= 0:
            top[i] = top[p]
    return top


def _num_levels(node_parent: np.ndarray) -> int:
    level: list[int] = []
    for p in node_parent.tolist():
        level.append(level[p] + 1 if p >= 0 else 1)
    return max(level, default=0)


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + lens[i])."""
    offsets = np.concatenate(([0], np.cumsum(lens)[:-1]))
    return np.repeat(starts - offsets, lens) + np.arange(int(lens.sum()))
