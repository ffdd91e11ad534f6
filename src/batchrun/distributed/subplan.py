"""A unit's own plan: the requests of one unit cut out of the whole plan, with its layout renumbered, so that a
worker runs it with the unchanged engine and receives only the token ids and records that the unit needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchrun.planner import PlanLayout, make_layout
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
    `node_request` becomes its first local member; the groups are the runs of the plan's groups among the rows;
    batches are re-cut greedily under `kv_budget_tokens`, as the planner cuts them.
    """
    rows = np.asarray(rows, np.int64)
    num = len(rows)
    prompt_len = tokens.lengths[rows].astype(np.int64)
    forest = layout.forest.restrict(rows)
    local = np.arange(num)
    max_tokens = np.array([requests[i].sampling.max_tokens for i in rows.tolist()], np.int64)
    sub = make_layout(forest, node_request=forest.spans(local).first, order=local,
                      group_indptr=np.append(forest.group_starts(local), num), prompt_len=prompt_len,
                      max_tokens=max_tokens, budget_tokens=kv_budget_tokens, kv_bytes_per_token=kv_bytes_per_token)
    indptr = np.concatenate(([0], np.cumsum(prompt_len))).astype(np.int64)
    flat = tokens.tokens[_ranges(tokens.indptr[rows], prompt_len)] if num else tokens.tokens[:0]
    return SubPlan(rows=rows, requests=[requests[i] for i in rows.tolist()],
                   tokens=TokenTable(flat, indptr), layout=sub)


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + lens[i])."""
    offsets = np.concatenate(([0], np.cumsum(lens)[:-1]))
    return np.repeat(starts - offsets, lens) + np.arange(int(lens.sum()))
