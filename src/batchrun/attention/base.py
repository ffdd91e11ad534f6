"""The cascade attention interface: the attention state `(o, lse)` with the LSE in natural log, its merge, and
the abstract backend the engine calls (once per step to lay out each attention part, per layer to run it).

An empty part is `o = 0, lse = -inf`; merging two empty parts gives the same, never NaN.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch


class AttentionState(NamedTuple):
    o: torch.Tensor  # float32 [rows, Hq, D]
    lse: torch.Tensor  # float32 [rows, Hq], natural log (as torch.logsumexp)


def merge_state(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> AttentionState:
    """Merges two attention states over disjoint keys: v [rows, H, D], s [rows, H] (natural-log LSE)."""
    s = torch.logaddexp(s_a, s_b)  # -inf and -inf give -inf
    # Clamping keeps exp(-inf - s) at 0 instead of exp(-inf + inf) = NaN when both parts are empty.
    s_safe = s.clamp_min(torch.finfo(s.dtype).min)
    w_a = torch.exp(s_a - s_safe).unsqueeze(-1)
    w_b = torch.exp(s_b - s_safe).unsqueeze(-1)
    return AttentionState(v_a * w_a + v_b * w_b, s)


def merge_state_into(
    v: torch.Tensor,
    s: torch.Tensor,
    v_other: torch.Tensor,
    s_other: torch.Tensor,
    *,
    rows: torch.Tensor | slice,
) -> None:
    """In place: `v[rows], s[rows] = merge_state(v[rows], s[rows], v_other, s_other)`.

    `rows` is an int64 index tensor or a slice (a slice merges into views, without gather and scatter)."""
    if isinstance(rows, slice):
        merged = merge_state(v[rows], s[rows], v_other, s_other)
        v[rows] = merged.o
        s[rows] = merged.lse
        return
    merged = merge_state(v.index_select(0, rows), s.index_select(0, rows), v_other, s_other)
    v.index_copy_(0, rows, merged.o)
    s.index_copy_(0, rows, merged.lse)


Layout = TypeVar("Layout")


class AttentionBackend(ABC, Generic[Layout]):
    """Cascade attention over a KV slot pool `k_cache, v_cache: [num_slots, Hkv, D]` addressed by slot indices.

    Once per step, on the host: `prepare_prefix` and `prepare_own` turn a part's ragged metadata (numpy) into
    the backend's `Layout`, which every layer reuses (so a layer's launches need no device sync). Per layer:
    `prefix` and `own` run a layout over that layer's pool and return a new state; `merge_into` is the only
    call that modifies its arguments (the own part's state, in place). `gqa_ratio` = query heads per KV head.
    """

    name: str

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def prepare_prefix(
        self, *, q_start: np.ndarray, q_len: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, gqa_ratio: int
    ) -> Layout:
        """Segment g's rows `q[q_start[g] : q_start[g] + q_len[g]]` attend non-causally to the slots
        `kv_indices[kv_indptr[g] : kv_indptr[g + 1]]`; output rows are the segments' rows in segment order."""

    @abstractmethod
    def prepare_own(
        self, *, q_indptr: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, gqa_ratio: int
    ) -> Layout:
        """Sequence s owns rows `q_indptr[s] : q_indptr[s + 1]` and the slots `kv_indices[kv_indptr[s] :
        kv_indptr[s + 1]]`; query i of q_len sees key j iff j <= kv_len - q_len + i. Rows stay in place."""

    @abstractmethod
    def prefix(
        self, layout: Layout, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        """A prefix part: q [N, Hq, D] → (o float32 [sum(q_len), Hq, D], lse float32 [sum(q_len), Hq])."""

    @abstractmethod
    def own(
        self, layout: Layout, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        """The own part: q [N, Hq, D] → (o float32 [N, Hq, D], lse float32 [N, Hq])."""

    @abstractmethod
    def merge_into(
        self, o: torch.Tensor, lse: torch.Tensor, o_other: torch.Tensor, lse_other: torch.Tensor, *,
        rows: torch.Tensor | slice,
    ) -> None:
        """In place: `o[rows], lse[rows] = merge_state(o[rows], lse[rows], o_other, lse_other)`."""
