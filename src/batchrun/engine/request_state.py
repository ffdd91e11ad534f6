"""What a run knows of each request (indexed by plan row) and each shared node: the tokens generated so far
and the KV slots held. Pure bookkeeping (numpy, no torch); the engine decides when slots are taken and freed.
"""

from __future__ import annotations

import numpy as np


class RequestState:
    """Per request: tokens generated, the last one (the next decode step's input), the output ids, the slots
    of its own KV; per shared node: the slots of its segment. `None` slots: not admitted, or released."""

    def __init__(self, *, num_requests: int, num_nodes: int) -> None:
        self.num_generated = np.zeros(num_requests, np.int64)
        self.last_token = np.zeros(num_requests, np.int64)
        self.output_ids: list[list[int]] = [[] for _ in range(num_requests)]
        self.request_slots: list[np.ndarray | None] = [None] * num_requests
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
        self.request_slots[request] = slots

    def hold_node(self, node: int, slots: np.ndarray) -> None:
        assert self.node_slots[node] is None, f"node {node} admitted twice"
        self.node_slots[node] = slots

    def release_request(self, request: int) -> np.ndarray:
        """The request is done: forgets its output and returns its slots (to be freed)."""
        slots = self.request_slots[request]
        assert slots is not None, f"request {request} released twice"
        self.request_slots[request] = None
        self.output_ids[request] = []
        return slots

    def release_node(self, node: int) -> np.ndarray:
        """The node's last reader is done: returns its slots (to be freed)."""
        slots = self.node_slots[node]
        assert slots is not None, f"node {node} freed twice"
        self.node_slots[node] = None
        return slots
