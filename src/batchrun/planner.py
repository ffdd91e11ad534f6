"""Plans a file's requests: shared-prefix levels, groups, their order and memory-sized batches → PlanLayout
(no torch). Batches are cut with kv_accounting, the count the run-time scheduler admits by, so plan and run agree.

Prefix selection. The radix tree is built over every prompt minus its last token, so each request keeps at
least one own token (its own prefill yields the logits of its first output token). A chosen tree node v
becomes a shared level: its segment, the tokens since the nearest chosen ancestor u, is computed once for
its m(v) member requests instead of m(v) times, saving (m(v) - 1) * (depth(v) - depth(u)) prompt tokens.
Constraints: m(v) >= 2, segment >= min_prefix_len (a shorter level costs an extra attention part per step
for little gain), at most max_levels chosen nodes on any root-to-leaf path.
BatchLLM's one-level rule (split a child g out of a first-level node c when (leaves(g) - 1) * len(g) - len(c)
> 0, duplicating c) and a greedy top-down walk are both local versions of this trade: choosing a node moves
its segment's duplicated tokens into a shared level, but may make a deeper node's segment too short or use
up a level a deeper, more profitable node needed (max_levels = 1 with system prompt → documents is the
case where top-down greed keeps the short system prompt and loses every document). We maximise the total
saving exactly with a dynamic programme over the nodes with m >= 2 (the "skeleton"); the state is (nearest
chosen ancestor, levels left), so the work is O(sum over skeleton nodes of ancestors x levels), one small
numpy step per skeleton node. Ties keep the node unshared (fewer levels). With min_prefix_len = 1 and
levels unlimited every skeleton node is chosen: each distinct prompt prefix is computed once. Cuts are only
made at tree nodes: a cut inside an edge could let a child segment shorter than min_prefix_len qualify, but
gains at most (m - 1) * min_prefix_len tokens there, and makes levels no system prompt or document has.

One level (max_levels = 1) is BatchLLM's setting, where a chosen node need not be shared by its whole subtree:
its long child g may become a top-level group of its own, computing the parent's tokens again, while the
parent's other members stay a group (the paper's gain rule). Chosen nodes may then nest; each request reads
its deepest chosen node, computed whole from token 0. The saving is the sum over requests of the depth they
read, less each chosen node's depth; `_select_single_level` maximises it exactly (state: the depth of the
nearest chosen ancestor), so no clustering into groups that each share their common prefix computes less.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from batchrun.forest import PrefixForest
from batchrun.kv_accounting import KVAccounting
from batchrun.tokens import TokenTable
from batchrun.trie import RadixTree, build_radix_tree


@dataclass(frozen=True)
class PlannerConfig:
    """Planning parameters; the user-facing defaults are in batchrun.defaults (the CLI passes them)."""

    kv_budget_bytes: int  # KV memory a batch may hold
    min_prefix_len: int  # shortest shared segment, in tokens
    max_levels: int  # deepest chain of shared prefixes a request reads
    share: bool  # False: no sharing at all, every request runs plain

    def __post_init__(self) -> None:
        for name in ("kv_budget_bytes", "min_prefix_len", "max_levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PlannerConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.share, bool):
            raise ValueError(f"PlannerConfig.share must be a bool, got {self.share!r}")


@dataclass(frozen=True)
class PlanLayout:
    """The plan's arrays (see docs/architecture.md, "Plan layout") and its summary numbers.

    Shared nodes are topologically ordered; node i's own segment is [node_len[node_parent[i]], node_len[i]).
    Requests are the valid requests in input order; request r's own tokens are
    [node_len[request_node[r]], prompt_len[r]) (from 0 when request_node[r] == -1), never empty.
    """

    node_parent: np.ndarray  # int32 [N]; -1 at the top level
    node_len: np.ndarray  # int32 [N]; the prefix's end position, counted from token 0
    node_request: np.ndarray  # int32 [N]; a member whose first node_len tokens are the prefix
    request_node: np.ndarray  # int32 [R]; deepest shared node a request reads, -1 for none
    order: np.ndarray  # int32 [R]; execution order, every node's members contiguous
    group_indptr: np.ndarray  # int32 [G + 1] into order; top-level groups by decode ratio, largest first
    batch_indptr: np.ndarray  # int32 [B + 1] into order; memory-sized batches
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens computed: each shared segment once plus every own part
    saved_prefill_tokens: int  # prompt_tokens - prefill_tokens
    num_groups: int
    num_levels: int  # deepest chain of shared nodes
    num_shared_nodes: int
    num_batches: int
    max_batch_kv_bytes: int

    def __post_init__(self) -> None:
        arrays = ("node_parent", "node_len", "node_request", "request_node", "order", "group_indptr",
                  "batch_indptr")
        for name in arrays:
            a = getattr(self, name)
            assert a.dtype == np.int32 and a.ndim == 1, name
        num_nodes, num_requests = len(self.node_parent), len(self.request_node)
        assert len(self.node_len) == len(self.node_request) == num_nodes == self.num_shared_nodes
        assert bool(np.all(self.node_parent < np.arange(num_nodes)))
        assert len(self.order) == num_requests
        for indptr, count in ((self.group_indptr, self.num_groups), (self.batch_indptr, self.num_batches)):
            assert len(indptr) == count + 1 and indptr[0] == 0 and indptr[-1] == num_requests
        assert self.saved_prefill_tokens == self.prompt_tokens - self.prefill_tokens

    @cached_property
    def forest(self) -> PrefixForest:
        """The shared nodes as a forest: chains, levels, segments, spans."""
        return PrefixForest.from_arrays(node_parent=self.node_parent, node_len=self.node_len,
                                        request_node=self.request_node)


def request_kv_bytes(prompt_len: np.ndarray, max_tokens: np.ndarray, *, kv_bytes_per_token: int) -> np.ndarray:
    """int64 [R]: KV bytes each request holds when it runs alone. A request above the KV budget can never
    run: callers turn it into an error record before planning (plan_requests asserts there is none)."""
    return (np.asarray(prompt_len, np.int64) + np.asarray(max_tokens, np.int64)) * kv_bytes_per_token


def kv_tokens(layout: PlanLayout, *, prompt_len: np.ndarray, max_tokens: np.ndarray,
              requests: np.ndarray) -> int:
    """KV tokens that running `requests` of the layout together holds (kv_accounting.KVAccounting.tokens)."""
    return KVAccounting(layout.forest, prompt_len=prompt_len, max_tokens=max_tokens).tokens(requests)


def plan_requests(tokens: TokenTable, max_tokens: np.ndarray, *, kv_bytes_per_token: int,
                  config: PlannerConfig) -> PlanLayout:
    """Plans the requests of `tokens` (row i = request i, every prompt non-empty, every request within the
    budget alone: see request_kv_bytes)."""
    prompt_len = tokens.lengths
    max_tokens = np.asarray(max_tokens, dtype=np.int64)
    assert len(max_tokens) == len(tokens) and bool(np.all(prompt_len >= 1)) and bool(np.all(max_tokens >= 0))
    assert kv_bytes_per_token >= 1
    budget = config.kv_budget_bytes // kv_bytes_per_token
    assert bool(np.all(prompt_len + max_tokens <= budget)), "a request exceeds the KV budget alone"
    shared = _shared_prefixes(tokens, config)
    order, group_indptr = _order_groups(shared.forest, shared.dfs_order, prompt_len, max_tokens)
    return make_layout(shared.forest, node_request=shared.node_request, order=order, group_indptr=group_indptr,
                       prompt_len=prompt_len, max_tokens=max_tokens, budget_tokens=budget,
                       kv_bytes_per_token=kv_bytes_per_token)


def make_layout(forest: PrefixForest, *, node_request: np.ndarray, order: np.ndarray, group_indptr: np.ndarray,
                prompt_len: np.ndarray, max_tokens: np.ndarray, budget_tokens: int,
                kv_bytes_per_token: int) -> PlanLayout:
    """The layout of `forest`'s requests run in `order` (every node's members contiguous) in the groups
    `group_indptr`: greedy batches of at most `budget_tokens` KV tokens each, and the summary numbers."""
    kv = KVAccounting(forest, prompt_len=prompt_len, max_tokens=max_tokens)
    batches = kv.ranges(order).batches(budget_tokens)
    prompt_tokens = int(kv.prompt_len.sum())
    prefill = int(kv.node_tokens.sum() + kv.own_prompt_tokens.sum())
    as_i32 = lambda a: np.asarray(a).astype(np.int32)
    return PlanLayout(
        node_parent=as_i32(forest.node_parent),
        node_len=as_i32(forest.node_len),
        node_request=as_i32(node_request),
        request_node=as_i32(forest.request_node),
        order=as_i32(order),
        group_indptr=as_i32(group_indptr),
        batch_indptr=as_i32(batches.batch_indptr),
        prompt_tokens=prompt_tokens,
        prefill_tokens=prefill,
        saved_prefill_tokens=prompt_tokens - prefill,
        num_groups=len(group_indptr) - 1,
        num_levels=forest.num_levels,
        num_shared_nodes=forest.num_nodes,
        num_batches=len(batches.batch_indptr) - 1,
        max_batch_kv_bytes=batches.max_kv_tokens * kv_bytes_per_token,
    )


# -- prefix selection -----------------------------------------------------------------------------------------


class _Shared(NamedTuple):
    forest: PrefixForest
    node_request: np.ndarray  # int64 [N]; a member whose first node_len tokens are the prefix
    dfs_order: np.ndarray  # int64 [R]; every node's members contiguous


def _shared_prefixes(tokens: TokenTable, config: PlannerConfig) -> _Shared:
    num_requests = len(tokens)
    if not config.share:
        empty = np.zeros(0, dtype=np.int64)
        forest = PrefixForest(node_parent=empty, node_len=empty, request_node=np.full(num_requests, -1, np.int64))
        return _Shared(forest, empty, np.arange(num_requests, dtype=np.int64))
    tree = build_radix_tree(tokens, tokens.lengths - 1)
    if config.max_levels == 1:
        return _single_level(tree, _select_single_level(tree, min_prefix_len=config.min_prefix_len))
    is_shared = _select_levels(tree, min_prefix_len=config.min_prefix_len, max_levels=config.max_levels)
    tree_nodes = np.flatnonzero(is_shared)
    nearest = _nearest_shared(tree.node_parent, is_shared)  # [tree nodes] → shared node index or -1
    forest = PrefixForest.from_arrays(node_parent=nearest[tree.node_parent[tree_nodes]],
                                      node_len=tree.node_depth[tree_nodes], request_node=nearest[tree.request_node])
    return _Shared(forest, tree.node_ref[tree_nodes].astype(np.int64), tree.request_order.astype(np.int64))


def _single_level(tree: RadixTree, is_shared: np.ndarray) -> _Shared:
    """Every chosen node top-level, read by the requests whose deepest chosen node it is (a nested node's
    members leave its ancestor's group): members are made contiguous by a stable sort of the preorder."""
    tree_nodes = np.flatnonzero(is_shared)
    request_node = _nearest_shared(tree.node_parent, is_shared)[tree.request_node]  # int64 [R]
    dfs = tree.request_order.astype(np.int64)
    dfs = dfs[np.argsort(request_node[dfs], kind="stable")]
    node_request = np.empty(len(tree_nodes), np.int64)  # a member of each node: the first in the order
    readers = dfs[request_node[dfs] >= 0]
    node_request[request_node[readers][::-1]] = readers[::-1]
    forest = PrefixForest.from_arrays(node_parent=np.full(len(tree_nodes), -1, np.int64),
                                      node_len=tree.node_depth[tree_nodes], request_node=request_node)
    return _Shared(forest, node_request, dfs)


def _nearest_shared(tree_parent: np.ndarray, is_shared: np.ndarray) -> np.ndarray:
    """int64 [tree nodes]: index (among shared nodes, in preorder) of the deepest shared node at or above."""
    index = np.where(is_shared, np.cumsum(is_shared) - 1, -1).tolist()
    parent = tree_parent.tolist()
    for v in range(1, len(parent)):  # preorder: the parent is done first
        if index[v] < 0:
            index[v] = index[parent[v]]
    return np.asarray(index, dtype=np.int64)


def _select_levels(tree: RadixTree, *, min_prefix_len: int, max_levels: int) -> np.ndarray:
    """bool [tree nodes]: the nodes chosen as shared levels, maximising the saving (module docstring)."""
    skeleton = np.flatnonzero(tree.node_num_requests >= 2)[1:].tolist()  # preorder, root left out
    is_shared = np.zeros(tree.num_nodes, dtype=bool)
    if not skeleton:
        return is_shared
    parent, depth = tree.node_parent.tolist(), tree.node_depth.tolist()
    level = {0: 0}
    for x in skeleton:
        level[x] = level[parent[x]] + 1
    height = max(level.values())
    # When no path is deeper than max_levels the level count cannot bind: one column, never consumed.
    consume = max_levels < height
    dp = _LevelDP(depth=depth, members=tree.node_num_requests.tolist(), level=level, min_prefix_len=min_prefix_len,
                  num_cols=max_levels + 1 if consume else 2, consume=consume, height=height)
    stack: list[int] = []
    for x in skeleton:
        while stack and level[stack[-1]] >= level[x]:
            dp.close(stack.pop(), parent)
        dp.open(x)
        stack.append(x)
    while stack:
        dp.close(stack.pop(), parent)
    state = {0: (0, dp.num_cols - 1)}  # per node: (level of the nearest chosen ancestor, levels left) below it
    for x in skeleton:
        j, r = state[parent[x]]
        is_shared[x] = dp.take[x][j, r]
        state[x] = (level[x], r - int(consume)) if is_shared[x] else (j, r)
    return is_shared


def _select_single_level(tree: RadixTree, *, min_prefix_len: int) -> np.ndarray:
    """bool [tree nodes]: the nodes chosen with one level, chosen nodes may nest (module docstring). For a
    skeleton node x with nearest chosen ancestor at level j, value[j] is the best saving in x's subtree: its
    requests not under a chosen node read the ancestor's depth; choosing x makes that x's depth, less its own."""
    skeleton = np.flatnonzero(tree.node_num_requests >= 2)[1:].tolist()  # preorder, root left out
    is_shared = np.zeros(tree.num_nodes, dtype=bool)
    if not skeleton:
        return is_shared
    parent, depth, members = tree.node_parent.tolist(), tree.node_depth.tolist(), tree.node_num_requests.tolist()
    level = {0: 0}
    for x in skeleton:
        level[x] = level[parent[x]] + 1
    path_depth = np.zeros(max(level.values()) + 1, np.int64)  # depth of the open node at each level
    child_value: dict[int, np.ndarray] = {}  # sum of the skeleton children's values, [level(x) + 1]
    child_members: dict[int, int] = {}
    take: dict[int, np.ndarray] = {}

    def close(x: int) -> None:
        lvl = level[x]
        below = child_value.pop(x, np.zeros(lvl + 1, np.int64))
        direct = members[x] - child_members.pop(x, 0)  # requests under x but under no skeleton child
        skip = below[:lvl] + direct * path_depth[:lvl]
        chosen = below[lvl] + direct * depth[x] - depth[x] if depth[x] >= min_prefix_len else -1
        take[x] = chosen > skip  # ties keep the node unshared; a member-less or one-member choice never wins
        value = np.maximum(skip, chosen)
        p = parent[x]
        child_value[p] = child_value[p] + value if p in child_value else value
        child_members[p] = child_members.get(p, 0) + members[x]

    stack: list[int] = []
    for x in skeleton:
        while stack and level[stack[-1]] >= level[x]:
            close(stack.pop())
        path_depth[level[x]] = depth[x]
        stack.append(x)
    while stack:
        close(stack.pop())
    state = {0: 0}  # per node: level of the nearest chosen ancestor below it
    for x in skeleton:
        j = state[parent[x]]
        is_shared[x] = take[x][j]
        state[x] = level[x] if is_shared[x] else j
    return is_shared


class _LevelDP:
    """Bottom-up tables for _select_levels. For a skeleton node x at level l, value[j, r] is the best saving
    inside x's subtree (x included) when the nearest chosen ancestor is x's ancestor at level j and r levels
    are left; take[x][j, r] says whether choosing x reaches it."""

    def __init__(self, *, depth: list[int], members: list[int], level: dict[int, int], min_prefix_len: int,
                 num_cols: int, consume: bool, height: int) -> None:
        self.depth, self.members, self.level = depth, members, level
        self.min_prefix_len, self.num_cols, self.consume = min_prefix_len, num_cols, consume
        self.path_depth = np.zeros(height + 1, dtype=np.int64)  # depth of the open node at each level
        self.skip_sum: dict[int, np.ndarray] = {}  # children's values with x unchosen: rows = x's ancestors
        self.take_sum: dict[int, np.ndarray] = {0: np.zeros(num_cols, np.int64)}  # ... with x chosen
        self.take: dict[int, np.ndarray] = {}

    def open(self, x: int) -> None:
        self.path_depth[self.level[x]] = self.depth[x]

    def close(self, x: int, parent: list[int]) -> None:
        lvl, cols = self.level[x], self.num_cols
        segment = self.depth[x] - self.path_depth[:lvl]  # [lvl]: tokens since each possible ancestor
        skip = self.skip_sum.pop(x, None)
        skip = np.zeros((lvl, cols), np.int64) if skip is None else skip
        below = self.take_sum.pop(x, np.zeros(cols, np.int64))
        take = np.full((lvl, cols), -1, dtype=np.int64)  # -1: not allowed (any allowed value is >= 0)
        below = below[:-1] if self.consume else below[1:]
        take[:, 1:] = ((self.members[x] - 1) * segment)[:, None] + below[None, :]
        take[segment < self.min_prefix_len] = -1
        self.take[x] = take > skip
        value = np.maximum(take, skip)
        p = parent[x]
        if lvl > 1:
            self.skip_sum[p] = self.skip_sum[p] + value[:-1] if p in self.skip_sum else value[:-1]
        self.take_sum[p] = self.take_sum[p] + value[-1] if p in self.take_sum else value[-1]


# -- groups, order, batches -----------------------------------------------------------------------------------


class _Groups(NamedTuple):
    order: np.ndarray  # int64 [R]
    group_indptr: np.ndarray  # int64 [G + 1]


def _order_groups(forest: PrefixForest, dfs: np.ndarray, prompt_len: np.ndarray, max_tokens: np.ndarray
                  ) -> _Groups:
    """Top-level nodes and lone requests as groups, by decode ratio (largest first, ties by first input index):
    a group's decode tokens over the prefill it really computes (each shared segment once, then the members'
    own tokens), so a group whose members share a long prefix counts as the decode-heavy work it is."""
    num_requests = len(dfs)
    if num_requests == 0:
        return _Groups(dfs, np.zeros(1, np.int64))
    starts = forest.group_starts(dfs)
    ends = np.append(starts[1:], num_requests)
    ranges = KVAccounting(forest, prompt_len=prompt_len, max_tokens=max_tokens).ranges(dfs)
    prefill = ranges.prefill_base[starts] + ranges.cum_prefill[ends]  # RangeCost.prefill, vectorised
    ratio = np.add.reduceat(max_tokens[dfs], starts).astype(np.float64) / prefill
    first_index = np.minimum.reduceat(dfs, starts)
    by_ratio = np.lexsort((first_index, -ratio))
    size = np.diff(np.append(starts, num_requests))[by_ratio]
    group_indptr = np.concatenate(([0], np.cumsum(size)))
    source = np.repeat(starts[by_ratio] - group_indptr[:-1], size) + np.arange(num_requests)
    return _Groups(dfs[source], group_indptr)
