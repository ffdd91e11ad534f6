"""Compressed radix tree over the token ids of many requests, for finding shared prefixes (no torch).

Edges are references into a TokenTable's flat array (a request index and a depth range), never per-token
objects; the finished tree is a set of numpy arrays with its nodes in preorder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchrun.forest import at_node
from batchrun.tokens import TokenTable


@dataclass(frozen=True)
class RadixTree:
    """Nodes in preorder with each node's children in first-token order, so a parent's index is below its
    children's and the requests in `request_order` are sorted lexicographically. Node 0 is the root (empty
    sequence). A node exists where sequences branch or where a sequence ends. The edge into node v holds
    tokens `[node_depth[parent], node_depth[v])` of request `node_ref[v]`.
    """

    node_parent: np.ndarray  # int32 [N]; -1 at the root
    node_depth: np.ndarray  # int64 [N]; tokens from the root to the end of the node's edge
    node_ref: np.ndarray  # int32 [N]; a request whose sequence passes through the node (-1 at the root)
    node_num_requests: np.ndarray  # int64 [N]; sequences that end in the node's subtree
    node_request_start: np.ndarray  # int64 [N]; those are request_order[start : start + num_requests]
    child_indptr: np.ndarray  # int64 [N + 1]; node v's children are child_node[child_indptr[v]:...[v + 1]]
    child_node: np.ndarray  # int32 [N - 1]; sorted by first token within each node
    child_token: np.ndarray  # int32 [N - 1]; the first token of each child's edge
    request_node: np.ndarray  # int32 [R]; the node where each request's sequence ends
    request_order: np.ndarray  # int32 [R]; requests in preorder (lexicographic, ties by request index)

    @property
    def num_nodes(self) -> int:
        return len(self.node_parent)

    @property
    def edge_len(self) -> np.ndarray:
        """int64 [N]: tokens on the edge into each node (0 at the root)."""
        return self.node_depth - at_node(self.node_depth, self.node_parent)  # the root's depth is 0

    def children(self, node: int) -> np.ndarray:
        return self.child_node[self.child_indptr[node] : self.child_indptr[node + 1]]

    def find_child(self, node: int, token: int) -> int:
        """The child of `node` whose edge starts with `token`, or -1."""
        lo, hi = int(self.child_indptr[node]), int(self.child_indptr[node + 1])
        i = lo + int(np.searchsorted(self.child_token[lo:hi], token))
        return int(self.child_node[i]) if i < hi and self.child_token[i] == token else -1


def build_radix_tree(tokens: TokenTable, lengths: np.ndarray | None = None) -> RadixTree:
    """The tree over the first `lengths[i]` tokens of each request i (all of them when lengths is None).

    Insertion walks O(depth) nodes per request in Python; numpy compares each edge in one call.
    """
    seq_len = tokens.lengths if lengths is None else np.asarray(lengths, dtype=np.int64)
    assert len(seq_len) == len(tokens) and bool(np.all((seq_len >= 0) & (seq_len <= tokens.lengths)))
    built = _insert_all(tokens, seq_len)
    return _freeze(tokens, built)


@dataclass
class _Built:
    """The tree during insertion: node lists indexed by insertion-order id."""

    parent: list[int]
    depth: list[int]
    ref: list[int]
    count: list[int]
    children: list[dict[int, int] | None]  # keyed by the child edge's first token; None while a leaf
    request_node: np.ndarray  # int64 [R]


def _insert_all(tokens: TokenTable, seq_len: np.ndarray) -> _Built:
    tok = tokens.tokens
    starts = tokens.indptr[:-1].tolist()
    parent, depth, ref, count = [-1], [0], [-1], [0]
    children: list[dict[int, int] | None] = [None]
    request_node = np.zeros(len(seq_len), dtype=np.int64)

    def new_node(p: int, d: int, r: int, c: int) -> int:
        parent.append(p)
        depth.append(d)
        ref.append(r)
        count.append(c)
        children.append(None)
        return len(parent) - 1

    def attach(p: int, token: int, child: int) -> None:
        kids = children[p]
        if kids is None:
            children[p] = {token: child}
        else:
            kids[token] = child

    # The walk is inlined (no helper per level) because it runs once per request and level.
    for r, n in enumerate(seq_len.tolist()):
        a = starts[r]
        node, d = 0, 0
        count[0] += 1
        while True:
            if d == n:
                break
            first = int(tok[a + d])
            kids = children[node]
            child = -1 if kids is None else kids.get(first, -1)
            if child < 0:
                node = new_node(node, n, r, 1)
                attach(parent[node], first, node)
                break
            end = min(depth[child], n)
            b = starts[ref[child]]
            differ = tok[a + d : a + end] != tok[b + d : b + end]
            k = int(differ.argmax())  # the first mismatch, or 0 when there is none
            k = d + k if differ.size and differ[k] else end
            if k == depth[child]:
                node, d = child, k
                count[node] += 1
                continue
            # Split the edge at k: the upper part becomes a node that also holds this request.
            mid = new_node(node, k, ref[child], count[child] + 1)
            kids[first] = mid  # type: ignore[index]
            parent[child] = mid
            attach(mid, int(tok[b + k]), child)
            node = mid
            if k < n:
                node = new_node(mid, n, r, 1)
                attach(mid, int(tok[a + k]), node)
            break
        request_node[r] = node
    return _Built(parent, depth, ref, count, children, request_node)


def _preorder(children: list[dict[int, int] | None]) -> np.ndarray:
    """Insertion ids in preorder, children in first-token order."""
    out: list[int] = []
    stack = [0]
    while stack:
        v = stack.pop()
        out.append(v)
        kids = children[v]
        if kids:
            stack.extend(kids[t] for t in sorted(kids, reverse=True))
    return np.asarray(out, dtype=np.int64)


def _freeze(tokens: TokenTable, built: _Built) -> RadixTree:
    old = _preorder(built.children)  # old[new id] = insertion id
    num_nodes = len(old)
    new_id = np.empty(num_nodes, dtype=np.int64)
    new_id[old] = np.arange(num_nodes)
    old_parent = np.asarray(built.parent, dtype=np.int64)[old]
    node_parent = np.where(old_parent >= 0, new_id[np.maximum(old_parent, 0)], -1).astype(np.int32)
    node_depth = np.asarray(built.depth, dtype=np.int64)[old]
    node_ref = np.asarray(built.ref, dtype=np.int64)[old]
    node_num_requests = np.asarray(built.count, dtype=np.int64)[old]
    request_node = new_id[built.request_node].astype(np.int32)
    request_order = np.argsort(request_node, kind="stable").astype(np.int32)
    # Requests ending at earlier preorder nodes come first, so a node's requests start after them.
    num_ending = np.bincount(request_node, minlength=num_nodes)
    node_request_start = np.concatenate(([0], np.cumsum(num_ending)[:-1])).astype(np.int64)
    # Preorder already visits each node's children in first-token order.
    child_node = (np.argsort(node_parent[1:], kind="stable") + 1).astype(np.int32)
    child_indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(node_parent[1:], minlength=num_nodes), out=child_indptr[1:])
    first_pos = tokens.indptr[node_ref[child_node]] + node_depth[node_parent[child_node]]
    return RadixTree(
        node_parent=node_parent,
        node_depth=node_depth,
        node_ref=node_ref.astype(np.int32),
        node_num_requests=node_num_requests,
        node_request_start=node_request_start,
        child_indptr=child_indptr,
        child_node=child_node,
        child_token=tokens.tokens[first_pos],
        request_node=request_node,
        request_order=request_order,
    )
