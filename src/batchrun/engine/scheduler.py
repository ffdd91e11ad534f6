"""Admission under the KV budget in plan order, and what each step computes (pure bookkeeping, no torch).

KV accounting is kv_accounting's, as in the plan: each resident shared node once (its own segment), plus per
admitted request its own prompt tokens and max_tokens, reserved at admission and released when it finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from batchrun.kv_accounting import KVAccounting


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int  # the KV budget, in tokens
    max_step_tokens: int  # decode tokens plus prefill chunks per step (decode tokens are never cut)

    def __post_init__(self) -> None:
        assert self.num_slots >= 0 and self.max_step_tokens > 0


class Chunk(NamedTuple):
    """Prefill of tokens [start, end) (absolute positions) of a shared node's segment or a request's own part."""

    is_node: bool
    index: int  # node id, or request id (row of the plan)
    start: int
    end: int
    is_last: bool  # completes the item's prefill (for a request: its first output token is sampled)


class Step(NamedTuple):
    """One step's work; apply it in field order (a rejection can free tokens that a later admission uses)."""

    freed_nodes: list[int]  # nodes released by rejections (finish() returns the others): free first
    rejected: list[int]  # requests that can never fit the budget: report them as failed
    admitted_nodes: list[int]  # became resident this step (ancestors first): allocate their segments
    admitted: list[int]  # requests admitted this step: allocate own prompt + max_tokens
    decode: np.ndarray  # int64 request ids, in plan order: one decode token each
    chunks: list[Chunk]  # prefill, in admission order: a node's chunks before its readers'


class _Item:
    """A queued prefill: a node's segment or a request's own prompt tokens, consumed in chunks."""

    __slots__ = ("is_node", "index", "pos", "end")

    def __init__(self, is_node: bool, index: int, pos: int, end: int) -> None:
        self.is_node, self.index, self.pos, self.end = is_node, index, pos, end


class Scheduler:
    """Owns admission, residency of shared nodes, the prefill queue and the decode set.

    `schedule()` admits what fits and composes the next step; `finish(r)` (request done or failed) releases
    its reservation and returns the nodes that it was the last unfinished member of.
    """

    def __init__(self, *, kv: KVAccounting, order: np.ndarray, is_skipped: np.ndarray, config: SchedulerConfig
                 ) -> None:
        self.config = config
        self.kv = kv
        self.forest = kv.forest
        num_nodes, num_requests = self.forest.num_nodes, self.forest.num_requests
        assert np.all(kv.decode_tokens >= 1), "every request generates at least one token"
        self.order = np.asarray(order, np.int64)
        self.plan_pos = np.empty(num_requests, np.int64)
        self.plan_pos[self.order] = np.arange(num_requests)
        # Unfinished members of each node (skipped requests do not count): a node is freed at zero.
        self.is_skipped = np.asarray(is_skipped, bool)
        self.num_members = self.forest.num_readers(np.flatnonzero(~self.is_skipped))
        self.is_resident = np.zeros(num_nodes, bool)
        self.was_resident = np.zeros(num_nodes, bool)
        self.is_admitted = np.zeros(num_requests, bool)
        self.is_finished = np.zeros(num_requests, bool)
        self.is_decoding_pos = np.zeros(num_requests, bool)  # by plan position
        self.is_done_pos = self.is_skipped[self.order].copy()  # finished, rejected or skipped, by position
        self.next_pos = 0  # next plan position to admit
        self.lo_pos = 0  # every position below it is done
        self.num_reserved = 0  # tokens
        self.num_running = 0  # admitted, unfinished requests
        self.queue: deque[_Item] = deque()

    # -- queries -------------------------------------------------------------------------------------------

    def node_tokens(self, node: int) -> int:
        """A resident node's segment: what admission reserves for it."""
        return int(self.kv.node_tokens[node])

    def request_tokens(self, request: int) -> int:
        """Own prompt tokens plus max_tokens: what admission reserves for the request itself."""
        return int(self.kv.request_tokens[request])

    @property
    def is_done(self) -> bool:
        return self.next_pos == len(self.order) and self.num_running == 0

    # -- stepping ------------------------------------------------------------------------------------------

    def schedule(self) -> Step | None:
        """Admits in plan order what fits the budget, then composes a step; None when no work remains."""
        admitted_nodes: list[int] = []
        admitted: list[int] = []
        rejected: list[int] = []
        freed_nodes: list[int] = []
        self._admit(admitted_nodes, admitted, rejected, freed_nodes)
        decode = self._decode_set()
        chunks = self._prefill_chunks(len(decode))
        if len(decode) == 0 and not chunks and not rejected:
            assert self.is_done, "work remains but nothing can run"
            return None
        return Step(freed_nodes, rejected, admitted_nodes, admitted, decode, chunks)

    def finish(self, request: int) -> list[int]:
        """The request is done (or failed): releases its tokens and returns the nodes freed with it."""
        assert self.is_admitted[request] and not self.is_finished[request], f"request {request} finished twice"
        self.is_finished[request] = True
        pos = int(self.plan_pos[request])
        self.is_decoding_pos[pos] = False
        self.is_done_pos[pos] = True
        self.num_running -= 1
        self.num_reserved -= self.request_tokens(request)
        freed = self._release_chain(request)
        if self.queue and any(not it.is_node and it.index == request or it.is_node and it.index in freed
                              for it in self.queue):
            # Only a failure mid-prefill leaves its own work queued.
            self.queue = deque(
                it for it in self.queue
                if not (not it.is_node and it.index == request or it.is_node and it.index in freed)
            )
        self._check()
        return freed

    # -- internals -----------------------------------------------------------------------------------------

    def _admit(
        self, admitted_nodes: list[int], admitted: list[int], rejected: list[int], freed_nodes: list[int]
    ) -> None:
        while self.next_pos < len(self.order):
            r = int(self.order[self.next_pos])
            if self.is_skipped[r]:
                self.next_pos += 1
                continue
            chain = self.forest.request_chain(r)
            new_nodes = [n for n in chain if not self.is_resident[n]]
            cost = sum(self.node_tokens(n) for n in new_nodes) + self.request_tokens(r)
            if self.num_reserved + cost > self.config.num_slots:
                if self.num_running > 0:
                    break  # wait for running work to finish and free its tokens
                # Nothing runs: what is resident belongs to r's own chain (members of a node are contiguous
                # in the plan order), so r can never fit.
                assert all(self.is_resident[n] == (n in chain) for n in np.flatnonzero(self.is_resident))
                rejected.append(r)
                self.is_done_pos[self.next_pos] = True
                self.next_pos += 1
                freed_nodes.extend(self._release_chain(r))
                continue
            for n in new_nodes:
                assert not self.was_resident[n], f"node {n} made resident twice"
                self.is_resident[n] = self.was_resident[n] = True
                self.queue.append(_Item(True, n, int(self.forest.node_start[n]), int(self.forest.node_len[n])))
                admitted_nodes.append(n)
            self.is_admitted[r] = True
            self.queue.append(_Item(False, r, int(self.forest.own_start[r]), int(self.kv.prompt_len[r])))
            admitted.append(r)
            self.num_reserved += cost
            self.num_running += 1
            self.next_pos += 1
        self._check()

    def _release_chain(self, request: int) -> list[int]:
        freed = []
        for n in self.forest.request_chain(request):
            self.num_members[n] -= 1
            assert self.num_members[n] >= 0
            if self.num_members[n] == 0 and self.is_resident[n]:
                self.is_resident[n] = False
                self.num_reserved -= self.node_tokens(n)
                freed.append(n)
        return freed

    def _decode_set(self) -> np.ndarray:
        while self.lo_pos < self.next_pos and self.is_done_pos[self.lo_pos]:
            self.lo_pos += 1
        window = np.flatnonzero(self.is_decoding_pos[self.lo_pos : self.next_pos])
        return self.order[self.lo_pos + window]

    def _prefill_chunks(self, num_decode: int) -> list[Chunk]:
        budget = self.config.max_step_tokens - num_decode
        chunks: list[Chunk] = []
        while budget > 0 and self.queue:
            item = self.queue[0]
            end = min(item.end, item.pos + budget)
            is_last = end == item.end
            chunks.append(Chunk(item.is_node, item.index, item.pos, end, is_last))
            budget -= end - item.pos
            item.pos = end
            if is_last:
                self.queue.popleft()
                if not item.is_node:
                    # Its first output token is sampled in this step; it decodes from the next one.
                    self.is_decoding_pos[self.plan_pos[item.index]] = True
        return chunks

    def _check(self) -> None:
        assert 0 <= self.num_reserved <= self.config.num_slots, (self.num_reserved, self.config.num_slots)
        assert self.num_running >= 0

