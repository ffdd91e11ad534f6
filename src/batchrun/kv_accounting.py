"""KV accounting: the KV tokens that a set of requests holds, the one count behind the planner's batches, the
scheduler's admission, the distributed units' cost and the sub-plans' batches (numpy, no torch).

A set of requests holds each distinct shared node it reads once (the node's segment) plus, per request, its own
prompt tokens and its decode reservation, max_tokens: the worst case. The plan's batches and the distributed
units' cost count it; a run does not (its KV grows with the tokens produced, engine/scheduler.py) and uses it
only to reject a request that could not finish alone and to cap its pool.
"""

from __future__ import annotations

from functools import cached_property
from typing import NamedTuple

import numpy as np

from batchrun.forest import NodeSpan, PrefixForest


class KVAccounting:
    """Per-node and per-request KV tokens over a prefix forest; `tokens` counts a set, `ranges` an order's
    contiguous ranges. Bytes are tokens times the model's KV bytes per token."""

    def __init__(self, forest: PrefixForest, *, prompt_len: np.ndarray, max_tokens: np.ndarray) -> None:
        self.forest = forest
        self.prompt_len = np.asarray(prompt_len).astype(np.int64)
        assert len(self.prompt_len) == len(np.asarray(max_tokens)) == forest.num_requests
        self.node_tokens = forest.segment_len  # int64 [N]: a resident node's segment
        self.own_prompt_tokens = self.prompt_len - forest.own_start  # int64 [R]
        assert bool(np.all(self.own_prompt_tokens >= 1)), "every request keeps at least one own prompt token"
        self.decode_tokens = np.asarray(max_tokens).astype(np.int64)  # int64 [R]: the decode reservation
        self.request_tokens = self.own_prompt_tokens + self.decode_tokens  # int64 [R]: a request's own KV

    def tokens(self, requests: np.ndarray) -> int:
        """KV tokens that running `requests` together holds."""
        requests = np.asarray(requests, np.int64)
        nodes = self.forest.read_nodes(requests)
        return int(self.node_tokens[nodes].sum() + self.request_tokens[requests].sum())

    def ranges(self, order: np.ndarray) -> RangeCost:
        """The cost of contiguous ranges of `order` (every node's members contiguous in it)."""
        return RangeCost(self, order)


class Batches(NamedTuple):
    batch_indptr: np.ndarray  # int64 [B + 1] into the order
    max_kv_tokens: int  # the largest batch's KV tokens


class RangeCost:
    """O(1) KV tokens of any range [a, b) of an order, split into prefill and decode.

    A range reads the chain of its first request plus every node whose first member lies in (a, b): members of
    a node are contiguous, so no other node can be read by it. With `opened[p]` the segments of the nodes whose
    first member is at p, prefill(a, b) = chain(a) - opened[a] + sum over [a, b) of (opened + own prompt).
    """

    def __init__(self, kv: KVAccounting, order: np.ndarray) -> None:
        order = np.asarray(order, np.int64)
        num = len(order)
        self.span: NodeSpan = kv.forest.spans(order)
        opened = np.zeros(num + 1, np.int64)  # nodes that no request of the order reads land at `num`
        np.add.at(opened, self.span.first, kv.node_tokens)
        self.cum_prefill = _cumsum(opened[:num] + kv.own_prompt_tokens[order])  # int64 [num + 1]
        self.cum_decode = _cumsum(kv.decode_tokens[order])  # int64 [num + 1]
        # prefill(a, b) = prefill_base[a] + cum_prefill[b]
        self.prefill_base = kv.forest.own_start[order] - opened[:num] - self.cum_prefill[:-1]  # int64 [num]

    def __len__(self) -> int:
        return len(self.prefill_base)

    @cached_property
    def _lists(self) -> tuple[list[int], list[int], list[int]]:
        """The arrays as Python lists: callers cut ranges one at a time, where list indexing is fastest."""
        return self.prefill_base.tolist(), self.cum_prefill.tolist(), self.cum_decode.tolist()

    def prefill(self, a: int, b: int) -> int:
        """Prompt tokens of [a, b): each shared segment it reads once, plus own prompt tokens."""
        assert a < b
        base, cum_prefill, _ = self._lists
        return base[a] + cum_prefill[b]

    def decode(self, a: int, b: int) -> int:
        """The decode reservations of [a, b)."""
        _, _, cum_decode = self._lists
        return cum_decode[b] - cum_decode[a]

    def cost(self, a: int, b: int) -> int:
        """KV tokens that running [a, b) together holds: prefill plus decode."""
        return self.prefill(a, b) + self.decode(a, b)

    def batches(self, budget: int) -> Batches:
        """Greedy batches in order, each the longest range from where the last ended that holds at most
        `budget` KV tokens (every request must fit alone). cost(a, e) = kv_base[a] + cum[e], so each cut is a
        binary search."""
        cum = self.cum_prefill + self.cum_decode
        kv_base = self.prefill_base - self.cum_decode[:-1]
        bounds, max_kv = [0], 0
        while bounds[-1] < len(self):
            b = bounds[-1]
            e = int(np.searchsorted(cum, budget - kv_base[b], side="right")) - 1
            assert e > b, "a request exceeds the KV budget alone"
            max_kv = max(max_kv, int(kv_base[b] + cum[e]))
            bounds.append(e)
        return Batches(np.asarray(bounds, np.int64), max_kv)


def _cumsum(values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values) + 1, np.int64)
    np.cumsum(values, out=out[1:])
    return out
