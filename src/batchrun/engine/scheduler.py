"""Admission under the KV budget in plan order, preemption when the pool runs out, and what each step computes
(pure bookkeeping, no torch).

KV grows with the tokens really produced: each resident shared node holds its segment once; an admitted request
holds its own prompt tokens (plus, after a preemption, the tokens it had generated, recomputed) and one more slot
per decode step. Admission looks ahead (a watermark of the pool plus a few steps of growth per running request),
never at max_tokens; when a step's decode tokens do not fit, the latest admitted requests are preempted (their
own KV dropped, recomputed on readmission). `reserve_max_tokens` keeps the old rule (reserve own prompt +
max_tokens at admission) for comparison: under it nothing is ever preempted.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from batchrun import defaults
from batchrun.kv_accounting import KVAccounting


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int  # the KV pool, in tokens
    max_step_tokens: int  # decode tokens plus prefill chunks per step (decode tokens are never cut)
    watermark: float = defaults.KV_WATERMARK  # share of the pool admission leaves free
    lookahead_steps: int = defaults.KV_LOOKAHEAD_STEPS  # decode steps of growth admission leaves per request
    reserve_max_tokens: bool = False  # the old rule: reserve max_tokens at admission (no growth, no preemption)

    def __post_init__(self) -> None:
        assert self.num_slots >= 0 and self.max_step_tokens > 0
        assert 0.0 <= self.watermark < 1.0 and self.lookahead_steps >= 0


class Chunk(NamedTuple):
    """Prefill of tokens [start, end) (absolute positions) of a shared node's segment or a request's own part
    (after a preemption, a request's part runs past its prompt into the tokens it had generated)."""

    is_node: bool
    index: int  # node id, or request id (row of the plan)
    start: int
    end: int
    is_last: bool  # completes the item's prefill (for a request: its next output token is sampled)


class Step(NamedTuple):
    """One step's work; apply it in field order (what is freed first is what later admissions use)."""

    freed_nodes: list[int]  # nodes released by rejections or under memory pressure: free first
    preempted: list[int]  # requests that lose their own KV (their outputs so far are kept): free next
    rejected: list[int]  # requests that can never fit the pool: report them as failed
    admitted_nodes: list[int]  # became resident this step (ancestors first): allocate their segments
    admitted: list[int]  # requests (re)admitted this step: allocate `own_tokens(r)` each
    decode: np.ndarray  # int64 request ids, in plan order: one decode token each, one new slot each
    chunks: list[Chunk]  # prefill, in admission order: a node's chunks before its readers'


class _Item:
    """A queued prefill: a node's segment or a request's own tokens, consumed in chunks."""

    __slots__ = ("is_node", "index", "pos", "end")

    def __init__(self, is_node: bool, index: int, pos: int, end: int) -> None:
        self.is_node, self.index, self.pos, self.end = is_node, index, pos, end


class Scheduler:
    """Owns admission, preemption, residency of shared nodes, the prefill queue and the decode set.

    `schedule()` frees room for the next step (preempting if it must), admits what fits and composes the step;
    `finish(r)` (request done or failed) releases its KV and returns the nodes it was the last unfinished
    member of. The scheduler counts each request's generated tokens itself (one per decode row and per
    completed own prefill), so it knows what a preempted request must recompute.
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
        # What a request needs at worst, alone with its chain: more than the pool and it can never finish.
        self.max_need = kv.prompt_len + kv.decode_tokens
        # Unfinished members of each node (skipped requests do not count): a node is freed at zero.
        self.is_skipped = np.asarray(is_skipped, bool)
        self.num_members = self.forest.num_readers(np.flatnonzero(~self.is_skipped))
        self.num_running_members = np.zeros(num_nodes, np.int64)
        self.is_resident = np.zeros(num_nodes, bool)
        self.is_running = np.zeros(num_requests, bool)  # admitted, holding its KV, unfinished
        self.is_finished = np.zeros(num_requests, bool)
        self.num_generated = np.zeros(num_requests, np.int64)
        self.held_tokens = np.zeros(num_requests, np.int64)  # own KV tokens held
        self.num_preemptions = 0
        self.is_decoding_pos = np.zeros(num_requests, bool)  # by plan position
        self.is_done_pos = self.is_skipped[self.order].copy()  # finished, rejected or skipped, by position
        self.next_pos = 0  # next plan position to admit
        self.lo_pos = 0  # every position below it is done
        self.preempted: list[int] = []  # plan positions waiting for readmission (a heap: earliest first)
        self.num_used = 0  # tokens held: resident nodes plus the running requests' own KV
        self.num_running = 0
        self.queue: deque[_Item] = deque()

    # -- queries -------------------------------------------------------------------------------------------

    def node_tokens(self, node: int) -> int:
        """A resident node's segment: what it holds."""
        return int(self.kv.node_tokens[node])

    def own_tokens(self, request: int) -> int:
        """Own KV tokens a running request holds: its own prompt tokens, the generated tokens recomputed after
        a preemption, and one per decode step."""
        return int(self.held_tokens[request])

    @property
    def num_committed(self) -> int:
        """Tokens held plus, under `reserve_max_tokens`, what the running requests reserve beyond them: what
        admission counts as taken."""
        if not self.config.reserve_max_tokens:
            return self.num_used
        running = np.flatnonzero(self.is_running)
        reserved = self.kv.own_prompt_tokens[running] + self.kv.decode_tokens[running]
        return self.num_used + int((reserved - self.held_tokens[running]).sum())

    @property
    def is_done(self) -> bool:
        return self.next_pos == len(self.order) and self.num_running == 0 and not self.preempted

    # -- stepping ------------------------------------------------------------------------------------------

    def schedule(self) -> Step | None:
        """Frees room for the running requests' next decode tokens, admits in plan order what fits (preempted
        requests first), then composes a step; None when no work remains."""
        step = Step(freed_nodes=[], preempted=[], rejected=[], admitted_nodes=[], admitted=[],
                    decode=np.zeros(0, np.int64), chunks=[])
        self._make_room(step)
        self._admit(step)
        decode = self._decode_set()
        self.held_tokens[decode] += 1
        self.num_used += len(decode)
        self.num_generated[decode] += 1
        chunks = self._prefill_chunks(len(decode))
        self._check()
        if len(decode) == 0 and not chunks and not step.rejected:
            assert self.is_done, "work remains but nothing can run"
            return None
        return step._replace(decode=decode, chunks=chunks)

    def finish(self, request: int) -> list[int]:
        """The request is done (or failed): releases its tokens and returns the nodes freed with it."""
        assert self.is_running[request] and not self.is_finished[request], f"request {request} finished twice"
        self.is_finished[request] = True
        self.is_done_pos[self.plan_pos[request]] = True
        self._stop_running(request)
        freed = self._release_chain(request)
        # Only a failure mid-prefill leaves its own work queued.
        self._drop_queued(lambda it: it.index in freed if it.is_node else it.index == request)
        self._check()
        return freed

    # -- admission -----------------------------------------------------------------------------------------

    def _admit(self, step: Step) -> None:
        while (pos := self._next_candidate()) is not None:
            r = int(self.order[pos])
            if self.max_need[r] > self.config.num_slots:
                # Even alone it could not reach max_tokens: rejected before it holds anything.
                step.rejected.append(r)
                self._take_candidate(pos)
                self.is_done_pos[pos] = True
                step.freed_nodes.extend(self._release_chain(r))
                continue
            chain = self.forest.request_chain(r)
            new_nodes = [n for n in chain if not self.is_resident[n]]
            own = int(self.kv.own_prompt_tokens[r] + self.num_generated[r])
            cost = sum(self.node_tokens(n) for n in new_nodes) + own
            if self.num_running == 0:
                self._free_idle_nodes(step, cost + self._reserve(r) - self._num_free(), keep=chain)
            elif cost + self._reserve(r) + self._lookahead() > self._num_free():
                break  # wait for running work to finish (or be preempted) and free its tokens
            assert cost + self._reserve(r) <= self._num_free(), "a request that fits alone always fits"
            self._take_candidate(pos)
            for n in new_nodes:
                self.is_resident[n] = True
                self.num_used += self.node_tokens(n)
                self.queue.append(_Item(True, n, int(self.forest.node_start[n]), int(self.forest.node_len[n])))
                step.admitted_nodes.append(n)
            self._start_running(r, own)
            step.admitted.append(r)

    def _next_candidate(self) -> int | None:
        """The next plan position to admit: preempted requests first (they hold their nodes' places)."""
        if self.preempted:
            return self.preempted[0]
        while self.next_pos < len(self.order) and self.is_skipped[self.order[self.next_pos]]:
            self.next_pos += 1
        return self.next_pos if self.next_pos < len(self.order) else None

    def _take_candidate(self, pos: int) -> None:
        if self.preempted and self.preempted[0] == pos:
            heapq.heappop(self.preempted)
        else:
            assert pos == self.next_pos
            self.next_pos += 1

    def _reserve(self, request: int) -> int:
        """Under the old rule, the rest of max_tokens a request reserves beyond what it holds."""
        if not self.config.reserve_max_tokens:
            return 0
        return int(self.kv.decode_tokens[request] - self.num_generated[request])

    def _lookahead(self) -> int:
        """Room admission leaves for the running requests' growth: this step's decode tokens, a watermark and
        a few steps per running request (the candidate counted among them)."""
        if self.config.reserve_max_tokens:
            return self.num_committed - self.num_used
        watermark = int(self.config.watermark * self.config.num_slots)
        return self._num_decoding() + watermark + self.config.lookahead_steps * (self.num_running + 1)

    def _num_free(self) -> int:
        return self.config.num_slots - self.num_used

    # -- preemption ----------------------------------------------------------------------------------------

    def _make_room(self, step: Step) -> None:
        """Until the decoding requests' next tokens fit: preempt the latest admitted requests (never the
        earliest running one, so the job always progresses), then free idle shared nodes."""
        while self._num_decoding() > self._num_free():
            victim = self._victim()
            if victim is not None:
                self._preempt(victim, step)
                continue
            num_freed = self._free_idle_nodes(step, self._num_decoding() - self._num_free())
            assert num_freed and self._num_decoding() <= self._num_free(), "the earliest request fits alone"

    def _num_decoding(self) -> int:
        return int(self.is_decoding_pos[self.lo_pos : self.next_pos].sum())

    def _victim(self) -> int | None:
        """The latest admitted running request (by plan position) that does not alone keep a shared node in
        use; else the latest one; None when only the earliest remains. Plan order is the order work would
        have run in, so the victim is the request whose recompute delays the rest least, and preempting a
        node's last running reader would leave the node idle in memory."""
        positions = np.flatnonzero(self.is_running[self.order[self.lo_pos : self.next_pos]]) + self.lo_pos
        if len(positions) <= 1:
            return None
        candidates = self.order[positions[:0:-1]].tolist()  # latest first, the earliest excluded
        for r in candidates:
            if all(self.num_running_members[n] >= 2 for n in self.forest.request_chain(r)):
                return r
        return candidates[0]

    def _preempt(self, request: int, step: Step) -> None:
        """Drops the request's own KV; it is readmitted (before new work) to recompute its prompt and the
        tokens it had generated, then samples on where it stopped."""
        self._stop_running(request)
        self._drop_queued(lambda it: not it.is_node and it.index == request)
        heapq.heappush(self.preempted, int(self.plan_pos[request]))
        self.num_preemptions += 1
        step.preempted.append(request)

    def _free_idle_nodes(self, step: Step, need: int, *, keep: list[int] | tuple[()] = ()) -> int:
        """Frees resident nodes that no running request reads (their readers are preempted or not admitted
        yet), latest first (children before parents), until `need` tokens are free, except `keep`; they are
        recomputed when a reader is admitted again."""
        num_freed = 0
        for n in np.flatnonzero(self.is_resident & (self.num_running_members == 0))[::-1].tolist():
            if num_freed >= need:
                break
            if n in keep:
                continue
            self.is_resident[n] = False
            self.num_used -= self.node_tokens(n)
            num_freed += self.node_tokens(n)
            step.freed_nodes.append(n)
            self._drop_queued(lambda it, n=n: it.is_node and it.index == n)
        return num_freed

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def _start_running(self, request: int, own: int) -> None:
        self.is_running[request] = True
        self.held_tokens[request] = own
        self.num_used += own
        self.num_running += 1
        self.num_running_members[self.forest.request_chain(request)] += 1
        end = int(self.kv.prompt_len[request] + self.num_generated[request])
        self.queue.append(_Item(False, request, int(self.forest.own_start[request]), end))

    def _stop_running(self, request: int) -> None:
        """Releases the request's own KV (its nodes stay: `_release_chain` decides those)."""
        self.is_running[request] = False
        self.is_decoding_pos[self.plan_pos[request]] = False
        self.num_used -= int(self.held_tokens[request])
        self.held_tokens[request] = 0
        self.num_running -= 1
        self.num_running_members[self.forest.request_chain(request)] -= 1

    def _release_chain(self, request: int) -> list[int]:
        freed = []
        for n in self.forest.request_chain(request):
            self.num_members[n] -= 1
            assert self.num_members[n] >= 0
            if self.num_members[n] == 0 and self.is_resident[n]:
                self.is_resident[n] = False
                self.num_used -= self.node_tokens(n)
                freed.append(n)
        return freed

    def _drop_queued(self, is_dropped: Callable[[_Item], bool]) -> None:
        if any(is_dropped(it) for it in self.queue):
            self.queue = deque(it for it in self.queue if not is_dropped(it))

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
                    # Its next output token is sampled in this step; it decodes from the next one.
                    self.is_decoding_pos[self.plan_pos[item.index]] = True
                    self.num_generated[item.index] += 1
        return chunks

    def _check(self) -> None:
        assert 0 <= self.num_used <= self.config.num_slots, (self.num_used, self.config.num_slots)
        assert self.num_running >= 0
