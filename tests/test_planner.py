"""The planner against brute force: layout invariants token by token, the optimal saving over every set of
shared prefixes, group order, and batches within the KV budget (counted independently of the planner)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from batchrun.planner import PlanLayout, PlannerConfig, kv_tokens, plan_requests, request_kv_bytes
from batchrun.tokens import TokenTable

UNLIMITED = 10**9
KVB = 2  # kv_bytes_per_token in these tests


def config(*, budget_tokens: int = UNLIMITED, min_prefix_len: int = 1, max_levels: int = UNLIMITED,
           share: bool = True) -> PlannerConfig:
    return PlannerConfig(kv_budget_bytes=budget_tokens * KVB, min_prefix_len=min_prefix_len,
                         max_levels=max_levels, share=share)


def plan(seqs: list[list[int]], max_tokens: list[int] | None = None, **kw: int | bool) -> PlanLayout:
    table = TokenTable.from_lists(seqs)
    mt = np.asarray(max_tokens if max_tokens is not None else [3] * len(seqs), dtype=np.int32)
    cfg = config(**kw)  # type: ignore[arg-type]
    layout = plan_requests(table, mt, kv_bytes_per_token=KVB, config=cfg)
    check_layout(seqs, mt.tolist(), layout, cfg)
    return layout


# -- oracles --------------------------------------------------------------------------------------------------


def chain(layout: PlanLayout, r: int) -> list[int]:
    """Shared nodes request r reads, top level first."""
    nodes, v = [], int(layout.request_node[r])
    while v >= 0:
        nodes.append(v)
        v = int(layout.node_parent[v])
    return nodes[::-1]


def brute_kv_tokens(layout: PlanLayout, seqs: list[list[int]], max_tokens: list[int], requests: list[int]) -> int:
    nodes = {v for r in requests for v in chain(layout, r)}
    shared = sum(int(layout.node_len[v]) - (int(layout.node_len[layout.node_parent[v]])
                                            if layout.node_parent[v] >= 0 else 0) for v in nodes)
    own = sum(len(seqs[r]) - own_start(layout, r) + max_tokens[r] for r in requests)
    return shared + own


def own_start(layout: PlanLayout, r: int) -> int:
    return int(layout.node_len[layout.request_node[r]]) if layout.request_node[r] >= 0 else 0


def check_layout(seqs: list[list[int]], max_tokens: list[int], layout: PlanLayout, cfg: PlannerConfig) -> None:
    num_requests, num_nodes = len(seqs), len(layout.node_len)
    order = layout.order.tolist()
    assert sorted(order) == list(range(num_requests))  # every request planned exactly once
    position = {r: p for p, r in enumerate(order)}
    members: list[list[int]] = [[] for _ in range(num_nodes)]
    computed = 0
    for r, seq in enumerate(seqs):
        # Every prompt token covered exactly once: the chain's segments, then the own part (never empty).
        covered: list[int] = []
        for v in chain(layout, r):
            members[v].append(r)
            assert len(covered) == (layout.node_len[layout.node_parent[v]] if layout.node_parent[v] >= 0 else 0)
            ref = seqs[int(layout.node_request[v])]
            covered += ref[len(covered) : int(layout.node_len[v])]
        assert len(seq) - len(covered) >= 1
        assert covered + seq[len(covered) :] == seq
        computed += len(seq) - len(covered)
    span = layout.forest.spans(layout.order)
    for v in range(num_nodes):
        parent = int(layout.node_parent[v])
        segment = int(layout.node_len[v]) - (int(layout.node_len[parent]) if parent >= 0 else 0)
        assert parent < v and segment >= cfg.min_prefix_len and len(members[v]) >= 2
        assert layout.node_request[v] in members[v]
        spots = sorted(position[r] for r in members[v])
        assert spots == list(range(spots[0], spots[0] + len(spots)))  # members contiguous in the order
        assert (span.first[v], span.end[v]) == (spots[0], spots[-1] + 1)
        computed += segment
    assert max((len(chain(layout, r)) for r in range(num_requests)), default=0) == layout.num_levels
    assert layout.num_levels <= cfg.max_levels
    prompt_tokens = sum(len(s) for s in seqs)
    assert (layout.prompt_tokens, layout.prefill_tokens) == (prompt_tokens, computed)
    assert layout.saved_prefill_tokens == prompt_tokens - computed and layout.num_shared_nodes == num_nodes
    check_groups(seqs, max_tokens, layout, members)
    check_batches(seqs, max_tokens, layout, cfg)


def check_groups(seqs: list[list[int]], max_tokens: list[int], layout: PlanLayout,
                 members: list[list[int]]) -> None:
    indptr = layout.group_indptr.tolist()
    assert layout.num_groups == len(indptr) - 1 and indptr[0] == 0 and indptr[-1] == len(seqs)
    keys = []
    for a, b in itertools.pairwise(indptr):
        group = layout.order[a:b].tolist()
        tops = {chain(layout, r)[0] if layout.request_node[r] >= 0 else None for r in group}
        assert len(tops) == 1
        top = tops.pop()
        # A top-level node's members, all of them; or a lone request.
        assert sorted(group) == (sorted(members[top]) if top is not None else group) and len(group) >= 1
        # Decode tokens over the prefill the group computes: its shared segments once, then own tokens.
        nodes = {v for r in group for v in chain(layout, r)}
        prefill = sum(int(layout.node_len[v]) - (int(layout.node_len[layout.node_parent[v]])
                                                 if layout.node_parent[v] >= 0 else 0) for v in nodes)
        prefill += sum(len(seqs[r]) - own_start(layout, r) for r in group)
        ratio = sum(max_tokens[r] for r in group) / prefill
        keys.append((-ratio, min(group)))
    assert keys == sorted(keys)  # by decode ratio, largest first, ties by first input index


def check_batches(seqs: list[list[int]], max_tokens: list[int], layout: PlanLayout, cfg: PlannerConfig) -> None:
    indptr = layout.batch_indptr.tolist()
    assert layout.num_batches == len(indptr) - 1 and indptr[0] == 0 and indptr[-1] == len(seqs)
    budget = cfg.kv_budget_bytes // KVB
    prompt_len = np.array([len(s) for s in seqs], dtype=np.int64)
    largest = 0
    for a, b in itertools.pairwise(indptr):
        batch = layout.order[a:b].tolist()
        need = brute_kv_tokens(layout, seqs, max_tokens, batch)
        assert b > a and need <= budget
        assert kv_tokens(layout, prompt_len=prompt_len, max_tokens=np.array(max_tokens),
                         requests=np.array(batch)) == need
        if b < len(seqs):  # greedy: the next request would not have fit
            assert brute_kv_tokens(layout, seqs, max_tokens, batch + [int(layout.order[b])]) > budget
        largest = max(largest, need)
    assert layout.max_batch_kv_bytes == largest * KVB


def brute_min_prefill(seqs: list[list[int]], *, min_prefix_len: int, max_levels: int) -> int | None:
    """The fewest prompt tokens computed over every set of shared prefixes, under the constraints; None when
    there are too many to enumerate. Candidates: every prefix of a prompt minus its last token that >= 2
    prompts have and where such a head ends or branches (a radix tree's nodes, found here from tuples)."""
    heads = [tuple(s[:-1]) for s in seqs]
    shared = {h[:k] for h in heads for k in range(1, len(h) + 1) if sum(g[:k] == h[:k] for g in heads) >= 2}
    candidates = sorted((c for c in shared if c in heads or len({h[len(c)] for h in heads
                                                                  if len(h) > len(c) and h[: len(c)] == c}) >= 2),
                        key=len)
    if len(candidates) > 12:
        return None
    best = sum(len(s) for s in seqs)
    for mask in range(1, 1 << len(candidates)):
        chosen = [c for i, c in enumerate(candidates) if mask >> i & 1]
        cost, ok = 0, True
        level: dict[tuple[int, ...], int] = {}
        for c in chosen:  # shortest first: a parent's level is known first
            parent = max((p for p in chosen if len(p) < len(c) and c[: len(p)] == p), key=len, default=())
            level[c] = level.get(parent, 0) + 1
            ok &= len(c) - len(parent) >= min_prefix_len and level[c] <= max_levels
            cost += len(c) - len(parent)
        if not ok:
            continue
        for s, h in zip(seqs, heads, strict=True):
            cost += len(s) - max((len(c) for c in chosen if h[: len(c)] == c), default=0)
        best = min(best, cost)
    return best


def partitions(items: list[int]):
    """Every set partition of `items` (Bell(len) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


def brute_batchllm_clustering(seqs: list[list[int]], *, min_prefix_len: int) -> int | None:
    """The fewest prompt tokens over every clustering of the requests into groups, each group computing the
    common prefix of its prompts-minus-last-token once (when >= min_prefix_len), then each member's rest:
    BatchLLM's one-level grouping, whatever its gain rule chose; None when there are too many to enumerate."""
    if len(seqs) > 8:
        return None
    heads = [s[:-1] for s in seqs]

    def cost(group: list[int]) -> int:
        common = 0
        while all(len(heads[r]) > common and heads[r][common] == heads[group[0]][common] for r in group):
            common += 1
        if len(group) < 2 or common < min_prefix_len:
            common = 0
        return (common if group else 0) + sum(len(seqs[r]) - common for r in group)

    return min(sum(cost(g) for g in part) for part in partitions(list(range(len(seqs)))))


def random_seqs(rng: np.random.Generator, *, num_requests: int, vocab: int, max_len: int) -> list[list[int]]:
    return [rng.integers(0, vocab, rng.integers(1, max_len + 1)).tolist() for _ in range(num_requests)]


def tree_seqs(rng: np.random.Generator, *, num_requests: int, vocab: int) -> list[list[int]]:
    """Hierarchical prompts (stem → branch → tail), short enough for brute force yet rich in sharing."""
    pieces = lambda n: [rng.integers(0, vocab, rng.integers(1, 5)).tolist() for _ in range(n)]
    stems, branches = pieces(int(rng.integers(1, 3))), pieces(int(rng.integers(1, 4)))
    return [stems[rng.integers(len(stems))] + branches[rng.integers(len(branches))]
            + rng.integers(0, vocab, rng.integers(0, 3)).tolist() for _ in range(num_requests)]


# -- tests ----------------------------------------------------------------------------------------------------


def test_random_plans_are_optimal_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    num_checked = 0
    for i in range(1000):
        seqs = (tree_seqs(rng, num_requests=int(rng.integers(2, 9)), vocab=int(rng.integers(2, 5))) if i % 4
                else random_seqs(rng, num_requests=int(rng.integers(1, 9)), vocab=2, max_len=6))
        min_prefix_len, max_levels = int(rng.integers(1, 4)), int(rng.choice([1, 2, 3, UNLIMITED]))
        # One level is BatchLLM's clustering (chosen prefixes may nest); more are nested levels.
        best = (brute_batchllm_clustering(seqs, min_prefix_len=min_prefix_len) if max_levels == 1
                else brute_min_prefill(seqs, min_prefix_len=min_prefix_len, max_levels=max_levels))
        if best is None:
            continue
        max_tokens = rng.integers(0, 5, len(seqs)).tolist()
        layout = plan(seqs, max_tokens, min_prefix_len=min_prefix_len, max_levels=max_levels)
        assert layout.prefill_tokens == best, (seqs, min_prefix_len, max_levels)
        num_checked += 1
    assert num_checked > 800


def test_unconstrained_sharing_computes_each_distinct_prefix_once() -> None:
    """min_prefix_len 1, levels unlimited: every distinct prefix of the prompts-minus-last-token is computed
    once, and every request computes exactly its last token."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        seqs = random_seqs(rng, num_requests=int(rng.integers(1, 60)), vocab=int(rng.integers(1, 4)),
                           max_len=int(rng.integers(1, 12)))
        layout = plan(seqs)
        distinct = {tuple(s[:k]) for s in seqs for k in range(1, len(s))}
        assert layout.prefill_tokens == len(distinct) + len(seqs)


def test_random_budgets_and_constraints_keep_invariants() -> None:
    rng = np.random.default_rng(2)
    for _ in range(40):
        seqs = random_seqs(rng, num_requests=int(rng.integers(1, 80)), vocab=2, max_len=int(rng.integers(1, 16)))
        max_tokens = rng.integers(0, 6, len(seqs)).tolist()
        need = max(len(s) + m for s, m in zip(seqs, max_tokens, strict=True))
        plan(seqs, max_tokens, budget_tokens=int(rng.integers(need, 3 * need + 40)),
             min_prefix_len=int(rng.integers(1, 5)), max_levels=int(rng.integers(1, 5)))


def test_no_sharing_computes_every_prompt_token() -> None:
    seqs = [[1, 2, 3, 4]] * 3 + [[1, 2, 3], [7]]
    layout = plan(seqs, [1, 2, 3, 4, 5], share=False)
    assert layout.prefill_tokens == layout.prompt_tokens == 16 and layout.num_shared_nodes == 0
    assert layout.num_groups == 5 and layout.order.tolist() == [4, 3, 2, 1, 0]  # decode ratio 5/1, 4/3, ...


def test_identical_prompts_share_all_but_the_last_token() -> None:
    layout = plan([[4, 5, 6, 7]] * 5)
    assert layout.node_len.tolist() == [3] and layout.prefill_tokens == 3 + 5 and layout.num_groups == 1


def test_prompt_that_is_a_prefix_of_another() -> None:
    layout = plan([[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4]])
    # Heads (1,2), (1,2,3,4), (1,2,3): the shared levels are (1,2) for all three and (1,2,3) for two.
    assert layout.node_len.tolist() == [2, 3] and layout.prefill_tokens == 3 + 4
    assert plan([[1, 2], [1, 2, 3]]).node_len.tolist() == [1]


def test_one_request_and_one_token_prompts_run_plain() -> None:
    assert plan([[1, 2, 3]]).num_shared_nodes == 0
    layout = plan([[5], [5], [5, 6]])  # the last token is never shared: nothing left to share
    assert layout.num_shared_nodes == 0 and layout.prefill_tokens == 4 and layout.num_groups == 3


def test_no_requests() -> None:
    layout = plan([])
    assert layout.num_groups == layout.num_batches == layout.prompt_tokens == 0


def hierarchy(*, system_len: int, doc_len: int, num_docs: int, per_doc: int, question_len: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    system = rng.integers(0, 30_000, system_len).tolist()
    docs = [rng.integers(0, 30_000, doc_len).tolist() for _ in range(num_docs)]
    return [system + d + rng.integers(0, 30_000, question_len).tolist() for d in docs for _ in range(per_doc)]


def test_system_document_question_hierarchy() -> None:
    seqs = hierarchy(system_len=300, doc_len=500, num_docs=4, per_doc=5, question_len=30)
    layout = plan(seqs, min_prefix_len=16, max_levels=4)
    assert layout.num_levels == 2 and sorted(layout.node_len.tolist()) == [300, 800, 800, 800, 800]
    assert layout.num_groups == 1 and layout.prefill_tokens == 300 + 4 * 500 + 20 * 30


def test_one_level_splits_documents_out_of_the_system_prompt() -> None:
    """With one level, sharing each document (carrying the system prompt) saves 4 * 4 * 800 tokens against
    19 * 300 for the system prompt alone: BatchLLM's gain rule, which a top-down walk would miss."""
    seqs = hierarchy(system_len=300, doc_len=500, num_docs=4, per_doc=5, question_len=30)
    layout = plan(seqs, min_prefix_len=16, max_levels=1)
    assert layout.num_levels == 1 and layout.node_len.tolist() == [800] * 4 and layout.num_groups == 4
    # A short system prompt shared by many, documents shared by two: the system prompt wins.
    seqs = hierarchy(system_len=300, doc_len=20, num_docs=10, per_doc=2, question_len=5)
    assert plan(seqs, min_prefix_len=16, max_levels=1).node_len.tolist() == [300]


def test_one_level_never_computes_more_than_batchllm_clustering() -> None:
    """On random three-level workloads (system → document → question) one level computes exactly the fewest
    tokens any clustering into groups can, and never more than one level without nesting did."""
    rng = np.random.default_rng(7)
    num_better = 0
    for _ in range(300):
        seqs = tree_seqs(rng, num_requests=int(rng.integers(2, 9)), vocab=int(rng.integers(2, 5)))
        min_prefix_len = int(rng.integers(1, 4))
        layout = plan(seqs, min_prefix_len=min_prefix_len, max_levels=1)
        assert layout.prefill_tokens == brute_batchllm_clustering(seqs, min_prefix_len=min_prefix_len), seqs
        nested_only = brute_min_prefill(seqs, min_prefix_len=min_prefix_len, max_levels=1)
        if nested_only is not None:
            assert layout.prefill_tokens <= nested_only
            num_better += layout.prefill_tokens < nested_only
    assert num_better > 10  # the split matters on such workloads


def test_one_level_splits_a_long_document_out_and_keeps_the_rest_on_the_system_prompt() -> None:
    # A 300-token system prompt read by 20 requests, 5 of which also share a 500-token document: the document's
    # readers get a top-level group of their own (the system prompt computed twice), the rest share it.
    rng = np.random.default_rng(5)
    system, doc = rng.integers(0, 30_000, 300).tolist(), rng.integers(0, 30_000, 500).tolist()
    seqs = [system + doc + rng.integers(0, 30_000, 20).tolist() for _ in range(5)]
    seqs += [system + rng.integers(0, 30_000, 40).tolist() for _ in range(15)]
    layout = plan(seqs, min_prefix_len=16, max_levels=1)
    assert sorted(layout.node_len.tolist()) == [300, 800] and layout.node_parent.tolist() == [-1, -1]
    assert layout.prefill_tokens == 300 + 800 + 5 * 20 + 15 * 40
    assert layout.num_groups == 2 and layout.num_levels == 1


def test_min_prefix_len_merges_short_levels_downwards() -> None:
    seqs = hierarchy(system_len=10, doc_len=50, num_docs=3, per_doc=4, question_len=5)
    layout = plan(seqs, min_prefix_len=16)
    assert layout.node_len.tolist() == [60] * 3  # the 10-token system prompt alone is too short


def test_deep_nested_turns_respect_max_levels_and_stay_optimal() -> None:
    """A conversation where each turn's prompt extends the last (two requests per turn): a chain of levels."""
    rng = np.random.default_rng(4)
    turns = [rng.integers(0, 100, int(n)).tolist() for n in rng.integers(2, 6, 8)]
    seqs = [sum(turns[: t + 1], []) + [1000 + 2 * t + k] for t in range(8) for k in range(2)]
    for max_levels in (1, 2, 3, UNLIMITED):
        layout = plan(seqs, min_prefix_len=3, max_levels=max_levels)
        best = brute_min_prefill(seqs, min_prefix_len=3, max_levels=max_levels)
        # One level may also nest prefixes (BatchLLM's split), so it can beat the one-level brute force.
        assert layout.prefill_tokens == best if max_levels > 1 else layout.prefill_tokens <= best
    assert layout.num_levels >= 4


def test_very_long_shared_prefix() -> None:
    seqs = hierarchy(system_len=20_000, doc_len=1, num_docs=1, per_doc=30, question_len=3)
    layout = plan(seqs, min_prefix_len=16)
    assert layout.node_len.tolist() == [20_001] and layout.prefill_tokens == 20_001 + 30 * 3


def test_group_larger_than_the_budget_runs_in_waves() -> None:
    seqs = hierarchy(system_len=100, doc_len=1, num_docs=1, per_doc=10, question_len=5)  # prompts of 106
    layout = plan(seqs, [10] * 10, budget_tokens=101 + 4 * 15, min_prefix_len=16)
    assert layout.num_groups == 1 and layout.batch_indptr.tolist() == [0, 4, 8, 10]
    assert layout.max_batch_kv_bytes == (101 + 4 * 15) * KVB  # the prefix counted in each wave


def test_groups_are_ordered_by_decode_ratio() -> None:
    seqs = [[1] * 20 + [2], [1] * 20 + [3], [4] * 5, [5] * 20 + [6], [5] * 20 + [7], [8] * 5]
    layout = plan(seqs, [1, 1, 50, 100, 100, 50], min_prefix_len=16)
    groups = [sorted(layout.order[a:b].tolist()) for a, b in itertools.pairwise(layout.group_indptr.tolist())]
    assert groups == [[2], [5], [3, 4], [0, 1]]  # ratios 10, 10 (tie: first input index), 200/22, 2/22


def test_the_order_counts_a_shared_prefix_once() -> None:
    # 16 members sharing 2,000 tokens, 64 output tokens each: 1,024 decode tokens over 2,016 computed (0.51),
    # not over 16 * 2,001 (0.03); a lone request with ratio 0.4 comes after it.
    seqs = [[7] * 2000 + [i] for i in range(16)] + [[9] * 100]
    layout = plan(seqs, [64] * 16 + [40], min_prefix_len=16)
    assert layout.order[:16].tolist() == list(range(16)) and layout.order[16] == 16


def test_request_over_the_budget_is_refused() -> None:
    assert request_kv_bytes(np.array([3, 10]), np.array([2, 0]), kv_bytes_per_token=4).tolist() == [20, 40]
    with pytest.raises(AssertionError):
        plan([[1, 2, 3], [1, 2, 4]], [5, 5], budget_tokens=7)


@pytest.mark.parametrize("bad", [{"kv_budget_bytes": 0}, {"min_prefix_len": 0}, {"max_levels": 0},
                                 {"max_levels": True}, {"share": 1}, {"min_prefix_len": 2.0}])
def test_config_validates_itself(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {"kv_budget_bytes": 1 << 20, "min_prefix_len": 16, "max_levels": 4,
                                 "share": True}
    with pytest.raises(ValueError):
        PlannerConfig(**(fields | bad))  # type: ignore[arg-type]
