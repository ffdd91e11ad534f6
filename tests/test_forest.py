"""The prefix forest against brute force (parent walks over Python lists) on planner-made layouts: depths, tops,
chains, segments, own starts, read sets, spans, group starts and restriction to a subset of requests."""

from __future__ import annotations

import numpy as np
import pytest

from batchrun.forest import PrefixForest, at_node
from batchrun.planner import PlanLayout, PlannerConfig, plan_requests
from batchrun.tokens import TokenTable


def nested_prompts(rng: np.random.Generator, num_requests: int) -> list[list[int]]:
    """Each prompt extends a random cut of an earlier one (or starts afresh): prefix trees of any depth."""
    prompts: list[list[int]] = []
    for _ in range(num_requests):
        base = prompts[rng.integers(len(prompts))] if prompts and rng.random() < 0.85 else []
        prompts.append(base[: int(rng.integers(0, len(base) + 1))] + rng.integers(0, 40, rng.integers(1, 8)).tolist())
    return prompts


def random_layout(rng: np.random.Generator) -> PlanLayout:
    prompts = nested_prompts(rng, int(rng.integers(0, 50)))
    config = PlannerConfig(kv_budget_bytes=10**9, min_prefix_len=int(rng.integers(1, 4)),
                           max_levels=int(rng.integers(1, 6)), share=bool(rng.random() < 0.9))
    return plan_requests(TokenTable.from_lists(prompts), np.ones(len(prompts), np.int64), kv_bytes_per_token=1,
                         config=config)


def chain(parent: list[int], node: int) -> list[int]:
    out = []
    while node != -1:
        out.append(node)
        node = parent[node]
    return out[::-1]


def check_forest(forest: PrefixForest, rng: np.random.Generator) -> None:
    parent, node_len, request_node = forest.node_parent.tolist(), forest.node_len.tolist(), forest.request_node.tolist()
    node_chains = [chain(parent, n) for n in range(len(parent))]
    request_chains = [chain(parent, n) for n in request_node]
    for n, c in enumerate(node_chains):
        assert forest.node_chain(n) == c and forest.node_depth[n] == len(c) - 1 and forest.node_top[n] == c[0]
        start = node_len[parent[n]] if parent[n] >= 0 else 0
        assert (forest.node_start[n], forest.segment_len[n]) == (start, node_len[n] - start)
        assert forest.node_chains(np.array([n]))[0].tolist() == c + [-1] * (forest.num_levels - len(c))
    assert forest.num_levels == max((len(c) for c in node_chains), default=0)
    assert forest.node_chain(-1) == [] and forest.node_chains(np.array([-1]))[0].tolist() == [-1] * forest.num_levels
    for r, c in enumerate(request_chains):
        assert forest.request_chain(r) == c
        assert forest.own_start[r] == (node_len[c[-1]] if c else 0)
        assert forest.request_top[r] == (c[0] if c else -1)
    num_requests = len(request_node)
    some = np.flatnonzero(rng.random(num_requests) < 0.5)
    assert forest.read_nodes(some).tolist() == sorted({n for r in some.tolist() for n in request_chains[r]})
    assert forest.num_readers(some).tolist() == [sum(n in request_chains[r] for r in some.tolist())
                                                 for n in range(len(parent))]


def check_order(forest: PrefixForest, order: np.ndarray) -> None:
    """Spans and group starts of an order in which every node's members are contiguous."""
    chains = [forest.request_chain(r) for r in order.tolist()]
    span = forest.spans(order)
    for n in range(forest.num_nodes):
        where = [p for p, c in enumerate(chains) if n in c]
        assert (span.first[n], span.end[n]) == ((where[0], where[-1] + 1) if where else (len(order), 0))
    tops = [c[0] if c else None for c in chains]
    starts = [p for p in range(len(order)) if p == 0 or tops[p] is None or tops[p] != tops[p - 1]]
    assert forest.group_starts(order).tolist() == starts


@pytest.mark.parametrize("seed", range(30))
def test_the_forest_of_random_layouts_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layout = random_layout(rng)
    forest = layout.forest
    assert forest.num_levels == layout.num_levels and forest.num_nodes == layout.num_shared_nodes
    check_forest(forest, rng)
    check_order(forest, layout.order.astype(np.int64))
    assert forest.group_starts(layout.order).tolist() == layout.group_indptr[:-1].tolist()
    rows = layout.order[rng.random(len(layout.order)) < 0.6].astype(np.int64)  # a subset kept in plan order
    check_order(forest, rows)
    sub = forest.restrict(rows)
    check_forest(sub, rng)
    check_order(sub, np.arange(len(rows)))
    assert sub.num_requests == len(rows) and sub.num_nodes == len(forest.read_nodes(rows))
    for i, r in enumerate(rows.tolist()):  # the same prefixes, renumbered
        assert sub.node_len[sub.request_chain(i)].tolist() == forest.node_len[forest.request_chain(r)].tolist()


def test_a_forest_without_nodes_or_requests() -> None:
    forest = PrefixForest.from_arrays(node_parent=[], node_len=[], request_node=[-1, -1])
    assert forest.num_levels == 0 and forest.own_start.tolist() == [0, 0] and forest.request_top.tolist() == [-1, -1]
    assert forest.request_chains(np.arange(2)).shape == (2, 0) and forest.read_nodes(np.arange(2)).tolist() == []
    assert forest.group_starts(np.arange(2)).tolist() == [0, 1]
    empty = PrefixForest.from_arrays(node_parent=[-1], node_len=[4], request_node=[])
    span = empty.spans(np.zeros(0, np.int64))
    assert (span.first.tolist(), span.end.tolist()) == ([0], [0]) and empty.group_starts(np.zeros(0)).tolist() == []


def test_at_node_reads_fill_for_none() -> None:
    assert at_node(np.array([5, 7]), np.array([1, -1, 0])).tolist() == [7, 0, 5]
    assert at_node(np.array([5, 7]), np.array([-1]), fill=-1).tolist() == [-1]


def test_invalid_forests_and_orders_are_refused() -> None:
    with pytest.raises(AssertionError, match="topologically"):
        PrefixForest.from_arrays(node_parent=[1, -1], node_len=[4, 2], request_node=[0])
    with pytest.raises(AssertionError, match="segment"):
        PrefixForest.from_arrays(node_parent=[-1, 0], node_len=[4, 4], request_node=[1])
    forest = PrefixForest.from_arrays(node_parent=[-1], node_len=[4], request_node=[0, -1, 0])
    with pytest.raises(AssertionError, match="contiguous"):
        forest.spans(np.arange(3))
