"""What a run knows of each request (indexed by plan row) and each shared node: the tokens generated so far
and the KV slots held. Pure bookkeeping (numpy, no torch); the engine decides when slots are taken and freed.
"""

from __future__ import annotations

import numpy as np


class RequestState:
    """Per request: tokens generated, the last one (the next decode step's input), the output ids, the slots
    of its own KV (growing by one per decode step); per shared node: the slots of its segment. `None` slots:
    not admitted, preempted, or released."""

    def __init__(self, *, num_requests: int, num_nodes: int) -> None:
        self.num_generated = np.zeros(num_requests, np.int64)
        self.last_token = np.zeros(num_requests, np.int64)
        self.output_ids: list[list[int]] = [[] for _ in range(num_requests)]
        # request_slots[r] is a view of the first num_slots of _slot_buffers[r], whose capacity doubles as it
        # grows: one decode slot per step costs amortised O(1), not a copy of the whole row.
        self.request_slots: list[np.ndarray | None] = [None] * num_requests
        self._slot_buffers: list[np.ndarray | None] = [None] * num_requests
        self.node_slots: list[np.ndarray | None] = [None] * num_nodes

    def append(self, requests: np.ndarray, tokens: np.ndarray) -> None:
        """One sampled token per request: requests, tokens int64 [M]."""
        self.num_generated[requests] += 1
        self.last_token[requests] = tokens
        for r, t in zip(requests.tolist(), tokens.tolist(), strict=True):
            self.output_ids[r].append(t)

    def is_admitted(self, request: int) -> bool:
        return self.request_slots[request] is not None

    def hold_request(self, request: int, slots: np.ndarray) -> None:
        assert self.request_slots[request] is None, f"request {request} admitted twice"
        buffer = np.empty(max(2 * len(slots), 16), np.int64)
        buffer[: len(slots)] = slots
        self._slot_buffers[request] = buffer
        self.request_slots[request] = buffer[: len(slots)]

    def grow(self, requests: np.ndarray, slots: np.ndarray) -> None:
        """One more slot per request (requests, slots int64 [M]): where this step's decode token is written."""
        for r, s in zip(requests.tolist(), slots.tolist(), strict=True):
            held, buffer = self.request_slots[r], self._slot_buffers[r]
            assert held is not None and buffer is not None, f"request {r} grows without being admitted"
            n = len(held)
            if n == len(buffer):
                buffer = np.empty(2 * n, np.int64)
                buffer[:n] = held
                self._slot_buffers[r] = buffer
            buffer[n] = s
            self.request_slots[r] = buffer[: n + 1]

    def hold_node(self, node: int, slots: np.ndarray) -> None:
        assert self.node_slots[node] is None, f"node {node} admitted twice"
        self.node_slots[node] = slots

    def preempt(self, request: int) -> np.ndarray:
        """The request loses its KV (it will be recomputed): returns its slots, keeps what it generated."""
        slots = self.request_slots[request]
        assert slots is not None, f"request {request} preempted while not admitted"
        self.request_slots[request] = self._slot_buffers[request] = None
        return slots.copy()

    def release_request(self, request: int) -> np.ndarray:
        """The request is done: forgets its output and returns its slots (to be freed)."""
        slots = self.preempt(request)
        self.output_ids[request] = []
        return slots

    def release_node(self, node: int) -> np.ndarray:
        """The node's last reader is done (or it is freed under memory pressure): returns its slots."""
        slots = self.node_slots[node]
        assert slots is not None, f"node {node} freed twice"
        self.node_slots[node] = None
        return slots
