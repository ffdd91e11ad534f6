"""The radix tree against a brute-force oracle over Python tuples: nodes, counts, order, children, edges."""

from __future__ import annotations

import numpy as np
import pytest

from batchrun.tokens import TokenTable
from batchrun.trie import RadixTree, build_radix_tree


def oracle_nodes(seqs: list[tuple[int, ...]]) -> set[tuple[int, ...]]:
    """Paths of a compressed trie: the root, every sequence end, every prefix where sequences branch."""
    nodes = {()} | set(seqs)
    prefixes = {s[:k] for s in seqs for k in range(len(s) + 1)}
    for p in prefixes:
        next_tokens = {s[len(p)] for s in seqs if len(s) > len(p) and s[: len(p)] == p}
        if len(next_tokens) >= 2:
            nodes.add(p)
    return nodes


def node_path(tree: RadixTree, table: TokenTable, v: int) -> tuple[int, ...]:
    if v == 0:
        return ()
    return tuple(table[int(tree.node_ref[v])][: int(tree.node_depth[v])].tolist())


def check_against_oracle(table: TokenTable, lengths: np.ndarray | None = None) -> RadixTree:
    tree = build_radix_tree(table, lengths)
    n = table.lengths if lengths is None else lengths
    seqs = [tuple(table[i][: int(n[i])].tolist()) for i in range(len(table))]
    paths = [node_path(tree, table, v) for v in range(tree.num_nodes)]
    assert sorted(paths) == sorted(oracle_nodes(seqs))  # each oracle node exactly once
    assert paths == sorted(paths)  # preorder with children by first token = lexicographic
    index = {p: v for v, p in enumerate(paths)}
    for v, p in enumerate(paths):
        members = [i for i, s in enumerate(seqs) if s[: len(p)] == p]
        assert tree.node_num_requests[v] == len(members)
        start = int(tree.node_request_start[v])
        assert sorted(tree.request_order[start : start + len(members)].tolist()) == members
        if v == 0:
            assert tree.node_parent[0] == -1 and tree.node_ref[0] == -1
            continue
        assert seqs[tree.node_ref[v]][: len(p)] == p  # the edge's reference passes through the node
        parent = max((q for q in paths if len(q) < len(p) and p[: len(q)] == q), key=len)
        assert tree.node_parent[v] == index[parent] < v
        assert tree.edge_len[v] == len(p) - len(parent)
        assert tree.find_child(index[parent], p[len(parent)]) == v
    for v in range(tree.num_nodes):
        kids = tree.children(v).tolist()
        assert kids == sorted(kids) and all(tree.node_parent[k] == v for k in kids)
    assert tree.request_node.tolist() == [index[s] for s in seqs]
    assert tree.request_order.tolist() == sorted(range(len(seqs)), key=lambda i: (seqs[i], i))
    return tree


def random_table(rng: np.random.Generator, *, num_requests: int, vocab: int, max_len: int) -> TokenTable:
    seqs = [rng.integers(0, vocab, rng.integers(0, max_len + 1)).tolist() for _ in range(num_requests)]
    return TokenTable.from_lists(seqs)


def test_random_small_vocab_matches_oracle() -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        table = random_table(rng, num_requests=int(rng.integers(1, 25)), vocab=int(rng.integers(1, 4)),
                             max_len=int(rng.integers(0, 9)))
        check_against_oracle(table)


def test_truncated_lengths_match_oracle() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        table = random_table(rng, num_requests=12, vocab=2, max_len=8)
        check_against_oracle(table, rng.integers(0, table.lengths + 1))


@pytest.mark.parametrize("seqs", [
    [[5, 6, 7]] * 4,  # identical
    [[1, 2], [1, 2, 3, 4], [1], [1, 2, 3]],  # each a prefix of the next
    [[], [], [3]],  # empty sequences end at the root
    [[9, 9, 9]],  # one request
    [[1], [2], [3]],  # nothing shared
    [[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3, 4, 5], [1, 2, 3]],
])
def test_edge_cases_match_oracle(seqs: list[list[int]]) -> None:
    check_against_oracle(TokenTable.from_lists(seqs))


def test_no_requests_is_a_bare_root() -> None:
    tree = build_radix_tree(TokenTable.from_lists([]))
    assert tree.num_nodes == 1 and len(tree.request_order) == 0 and tree.node_num_requests[0] == 0


def test_long_shared_prefix_and_deep_hierarchy() -> None:
    rng = np.random.default_rng(2)
    system = rng.integers(0, 50_000, 300).tolist()
    docs = [rng.integers(0, 50_000, 70).tolist() for _ in range(3)]
    seqs = [system + d + rng.integers(0, 50_000, 8).tolist() for d in docs for _ in range(4)]
    tree = check_against_oracle(TokenTable.from_lists(seqs + [system]))
    # root → system (13 requests) → 3 documents (4 each) → 12 questions
    assert sorted(tree.node_depth.tolist()) == [0, 300, 370, 370, 370] + [378] * 12
    assert tree.node_num_requests[tree.find_child(0, system[0])] == 13


def test_insertion_work_is_per_node_not_per_token() -> None:
    """Many requests under one long prefix: nodes stay O(requests), never O(tokens)."""
    rng = np.random.default_rng(3)
    prefix = rng.integers(0, 1000, 20_000).tolist()
    table = TokenTable.from_lists([prefix + [i] for i in range(200)])
    tree = build_radix_tree(table)
    assert tree.num_nodes == 202 and tree.node_depth[1] == 20_000
