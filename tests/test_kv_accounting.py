"""One KV count for everyone: on random layouts, the accounting, the planner's batches, the distributed units,
the sub-plans' batches and the scheduler's reservation all equal a brute-force count of what a set of requests
holds (each distinct shared segment once, plus own prompt tokens and max_tokens per request)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from batchrun.distributed.subplan import slice_plan
from batchrun.distributed.units import make_units, unit_config
from batchrun.kv_accounting import KVAccounting
from batchrun.planner import PlanLayout, PlannerConfig, kv_tokens, plan_requests
from batchrun.requests import Request, SamplingParams
from batchrun.tokens import TokenTable
from test_forest import nested_prompts
from test_planner import brute_kv_tokens
from test_scheduler import check_reservation


def check_greedy_batches(layout: PlanLayout, brute, budget: int) -> None:
    """Every batch within the budget, none extendable by the next request, the largest one reported."""
    largest = 0
    for a, b in itertools.pairwise(layout.batch_indptr.tolist()):
        need = brute(layout.order[a:b].tolist())
        assert a < b and need <= budget
        if b < len(layout.order):
            assert brute(layout.order[a : b + 1].tolist()) > budget
        largest = max(largest, need)
    assert layout.max_batch_kv_bytes == largest


@pytest.mark.parametrize("seed", range(25))
def test_every_user_counts_the_same_kv(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seqs = nested_prompts(rng, int(rng.integers(1, 45)))
    table = TokenTable.from_lists(seqs)
    prompt_len = table.lengths.astype(np.int64)
    max_tokens = rng.integers(1, 12, len(seqs))
    budget = int((prompt_len + max_tokens).max() + rng.integers(0, 150))
    layout = plan_requests(table, max_tokens, kv_bytes_per_token=1, config=PlannerConfig(
        kv_budget_bytes=budget, min_prefix_len=int(rng.integers(1, 3)), max_levels=int(rng.integers(1, 5)),
        share=True))
    kv = KVAccounting(layout.forest, prompt_len=prompt_len, max_tokens=max_tokens)
    brute = lambda requests: brute_kv_tokens(layout, seqs, max_tokens.tolist(), list(requests))
    for _ in range(20):  # any set of requests
        some = np.flatnonzero(rng.random(len(seqs)) < rng.random())
        assert kv.tokens(some) == brute(some.tolist()) == kv_tokens(layout, prompt_len=prompt_len,
                                                                    max_tokens=max_tokens, requests=some)
    costs = kv.ranges(layout.order)
    no_decode = KVAccounting(layout.forest, prompt_len=prompt_len, max_tokens=np.zeros(len(seqs), np.int64))
    for a, b in itertools.combinations(range(len(seqs) + 1), 2):  # any range of the order
        rows = layout.order[a:b]
        assert costs.cost(a, b) == brute(rows.tolist())
        assert (costs.prefill(a, b), costs.decode(a, b)) == (no_decode.tokens(rows), int(max_tokens[rows].sum()))
    check_greedy_batches(layout, brute, budget)
    assert costs.batches(budget).batch_indptr.tolist() == layout.batch_indptr.tolist()
    units = make_units(layout, prompt_len=prompt_len, max_tokens=max_tokens, config=unit_config(
        layout, max_tokens=max_tokens, kv_budget_tokens=budget, num_workers=int(rng.integers(1, 5))))
    for s, e, cost in zip(units.start.tolist(), units.end.tolist(), units.cost.tolist(), strict=True):
        assert cost == brute(layout.order[s:e].tolist())
    rows = layout.order[rng.random(len(seqs)) < 0.7].astype(np.int64)
    requests = [Request(line=i + 1, id=str(i), format="plain", endpoint="completions",
                        sampling=SamplingParams(max_tokens=int(m))) for i, m in enumerate(max_tokens)]
    sub = slice_plan(requests=requests, tokens=table, layout=layout, rows=rows, kv_budget_tokens=budget,
                     kv_bytes_per_token=1)
    sub_seqs = [seqs[r] for r in rows.tolist()]
    sub_brute = lambda local: brute_kv_tokens(sub.layout, sub_seqs, max_tokens[rows].tolist(), list(local))
    assert sub_brute(range(len(rows))) == brute(rows.tolist())  # renumbering keeps what the rows hold
    check_greedy_batches(sub.layout, sub_brute, budget)
    # The scheduler holds kv_tokens (equal to brute above) of what runs, so it too agrees.
    check_reservation(layout, kv, budget=budget, max_step_tokens=int(rng.integers(1, 40)),
                      out_len=[int(rng.integers(1, m + 1)) for m in max_tokens.tolist()])
