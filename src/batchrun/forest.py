"""The prefix forest of a plan: its shared nodes' levels, top-level nodes, chains, segments and spans, and each
request's chain and own start, computed from `node_parent`, `node_len` and `request_node` in one place, where
"-1 = no node" is handled once (`at_node`). Numpy only; the planner, engine and distributed code read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np


def at_node(values: np.ndarray, nodes: np.ndarray | int, *, fill: int = 0) -> np.ndarray:
    """values[nodes], with `fill` where a node is -1 (none)."""
    return np.append(values, fill)[nodes]


class NodeSpan(NamedTuple):
    first: np.ndarray  # int64 [N]; position in the order of the node's first member (len(order) if none)
    end: np.ndarray  # int64 [N]; one past its last (0 if none): the members are order[first:end]


@dataclass(frozen=True, kw_only=True)
class PrefixForest:
    """Shared prefix nodes, topologically ordered (a parent's index is below its children's), and the deepest
    node each request reads. Node n's segment is [node_start[n], node_len[n]); request r's own tokens start at
    own_start[r]. A node's members are the requests whose chain contains it. Depths count from 0 at the top.
    """

    node_parent: np.ndarray  # int64 [N]; -1 at the top level
    node_len: np.ndarray  # int64 [N]; the prefix's end position, counted from token 0
    request_node: np.ndarray  # int64 [R]; the deepest node a request reads, -1 for none

    def __post_init__(self) -> None:
        for name in ("node_parent", "node_len", "request_node"):
            a = getattr(self, name)
            assert a.dtype == np.int64 and a.ndim == 1, name
        num_nodes = len(self.node_parent)
        assert len(self.node_len) == num_nodes
        assert bool(np.all((self.node_parent >= -1) & (self.node_parent < np.arange(num_nodes)))), \
            "nodes must be topologically ordered"
        assert bool(np.all((self.request_node >= -1) & (self.request_node < num_nodes)))
        assert bool(np.all(self.segment_len >= 1)), "a node's segment is never empty"

    @classmethod
    def from_arrays(cls, *, node_parent: np.ndarray, node_len: np.ndarray, request_node: np.ndarray
                    ) -> PrefixForest:
        """The forest of a PlanLayout's arrays (any integer dtype)."""
        as_i64 = lambda a: np.asarray(a).astype(np.int64)
        return cls(node_parent=as_i64(node_parent), node_len=as_i64(node_len), request_node=as_i64(request_node))

    @property
    def num_nodes(self) -> int:
        return len(self.node_parent)

    @property
    def num_requests(self) -> int:
        return len(self.request_node)

    # -- per node and per request ---------------------------------------------------------------------------

    @cached_property
    def node_start(self) -> np.ndarray:
        """int64 [N]: where each node's segment starts (its parent's end; 0 at the top level)."""
        return at_node(self.node_len, self.node_parent)

    @cached_property
    def segment_len(self) -> np.ndarray:
        """int64 [N]: the tokens each node adds to its parent's prefix."""
        return self.node_len - self.node_start

    @cached_property
    def own_start(self) -> np.ndarray:
        """int64 [R]: where each request's own tokens start, i.e. the prompt tokens it reads from shared
        nodes (0 for none)."""
        return at_node(self.node_len, self.request_node)

    @cached_property
    def node_depth(self) -> np.ndarray:
        """int64 [N]: 0 at the top level."""
        depth = np.zeros(self.num_nodes, np.int64)
        up = self.node_parent
        while (has := up >= 0).any():  # one step per level
            depth += has
            up = at_node(self.node_parent, up, fill=-1)
        return depth

    @cached_property
    def num_levels(self) -> int:
        """The deepest chain of nodes (0 without nodes)."""
        return int(self.node_depth.max()) + 1 if self.num_nodes else 0

    @cached_property
    def node_top(self) -> np.ndarray:
        """int64 [N]: the top-level node above (or at) each node."""
        return self._chain_table[: self.num_nodes, 0] if self.num_nodes else np.zeros(0, np.int64)

    @cached_property
    def request_top(self) -> np.ndarray:
        """int64 [R]: the top-level node each request reads, -1 for none."""
        return at_node(self.node_top, self.request_node, fill=-1)

    # -- chains ---------------------------------------------------------------------------------------------

    @cached_property
    def _chain_table(self) -> np.ndarray:
        """int64 [N + 1, num_levels]: row n is n's chain, top level first, padded with -1; the last row (read
        by index -1) is all -1."""
        table = np.full((self.num_nodes + 1, self.num_levels), -1, np.int64)
        for d in range(self.num_levels):  # a parent's row is complete before its children copy it
            nodes = np.flatnonzero(self.node_depth == d)
            table[nodes] = table[self.node_parent[nodes]]
            table[nodes, d] = nodes
        return table

    def node_chains(self, nodes: np.ndarray) -> np.ndarray:
        """int64 [len(nodes), num_levels]: each node and its ancestors at their depths, padded with -1 (all -1
        for node -1)."""
        return self._chain_table[np.asarray(nodes, np.int64)]

    def request_chains(self, requests: np.ndarray) -> np.ndarray:
        """int64 [len(requests), num_levels]: the nodes each request reads, at their depths, padded with -1."""
        return self.node_chains(self.request_node[np.asarray(requests, np.int64)])

    @cached_property
    def _parent_list(self) -> list[int]:
        return self.node_parent.tolist()

    def node_chain(self, node: int) -> list[int]:
        """`node` and its ancestors, top level first ([] for -1)."""
        parent, chain = self._parent_list, []
        while node >= 0:
            chain.append(node)
            node = parent[node]
        return chain[::-1]

    def request_chain(self, request: int) -> list[int]:
        """The nodes a request reads, top level first."""
        return self.node_chain(int(self.request_node[request]))

    # -- sets of requests -----------------------------------------------------------------------------------

    def read_nodes(self, requests: np.ndarray) -> np.ndarray:
        """int64, ascending: every node the requests read (whole chains), each once."""
        chains = self.request_chains(requests)
        return np.unique(chains[chains >= 0])

    def num_readers(self, requests: np.ndarray) -> np.ndarray:
        """int64 [N]: how many of `requests` read each node."""
        chains = self.request_chains(requests)
        return np.bincount(chains[chains >= 0], minlength=self.num_nodes).astype(np.int64)

    def spans(self, order: np.ndarray) -> NodeSpan:
        """Where each node's members sit in `order` (requests among which every node's members are
        contiguous: a plan's order or any subset of it kept in that order)."""
        order = np.asarray(order, np.int64)
        first = np.full(self.num_nodes, len(order), np.int64)
        end = np.zeros(self.num_nodes, np.int64)
        if len(order) == 0:
            return NodeSpan(first, end)
        for column in self.request_chains(order).T:  # one per depth: a node's members are one run in it
            starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
            ends = np.r_[starts[1:], len(column)]
            node = column[starts]
            is_node = node >= 0
            assert len(np.unique(node[is_node])) == int(is_node.sum()), "a node's members must be contiguous"
            first[node[is_node]], end[node[is_node]] = starts[is_node], ends[is_node]
        return NodeSpan(first, end)

    def group_starts(self, order: np.ndarray) -> np.ndarray:
        """int64: the positions in `order` where a group starts: a top-level node's members, or a request that
        reads no node (alone)."""
        key = self.request_top[np.asarray(order, np.int64)]
        is_start = np.ones(len(key), bool)
        is_start[1:] = (key[1:] < 0) | (key[1:] != key[:-1])
        return np.flatnonzero(is_start)

    def restrict(self, requests: np.ndarray) -> PrefixForest:
        """The forest of `requests` alone (its request i is requests[i]): the nodes they read, renumbered in
        ascending order, so still topological."""
        requests = np.asarray(requests, np.int64)
        kept = self.read_nodes(requests)
        new_index = np.full(self.num_nodes, -1, np.int64)
        new_index[kept] = np.arange(len(kept))
        return PrefixForest(node_parent=at_node(new_index, self.node_parent[kept], fill=-1),
                            node_len=self.node_len[kept],
                            request_node=at_node(new_index, self.request_node[requests], fill=-1))
