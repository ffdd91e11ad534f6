"""The cascade attention interface: the attention state `(o, lse)` with the LSE in natural log, its merge,
the step's input (`CascadeInput`: the own part and one prefix part per depth), and the abstract backend the engine
calls (`prepare` once per step on the host, `attend` once per layer).

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


class OwnPart(NamedTuple):
    """Sequence s owns q rows `q_indptr[s] : q_indptr[s + 1]` and the KV slots `kv_indices[kv_indptr[s] :
    kv_indptr[s + 1]]`; its query i of q_len sees own key j iff j <= kv_len - q_len + i."""

    q_indptr: np.ndarray  # int64 [S + 1]
    kv_indices: np.ndarray  # int64 [sum kv_len]
    kv_indptr: np.ndarray  # int64 [S + 1]


class PrefixPart(NamedTuple):
    """Segment g: q rows `q_start[g] : q_start[g] + q_len[g]` attend non-causally to the slots `kv_indices[
    kv_indptr[g] : kv_indptr[g + 1]]` (one shared depth: segments never overlap)."""

    q_start: np.ndarray  # int64 [G]
    q_len: np.ndarray  # int64 [G]
    kv_indices: np.ndarray  # int64 [sum kv_len]
    kv_indptr: np.ndarray  # int64 [G + 1]


class CascadeInput(NamedTuple):
    """One step's attention over q rows [0, num_rows): the own part and one prefix part per shared depth
    (host arrays, built by engine/batch.py). `gqa_ratio` = query heads per KV head."""

    num_rows: int
    own: OwnPart
    prefixes: tuple[PrefixPart, ...]
    gqa_ratio: int


Layout = TypeVar("Layout")


class AttentionBackend(ABC, Generic[Layout]):
    """Cascade attention over a KV slot pool `k_cache, v_cache: [num_slots, Hkv, D]` addressed by slot indices.

    `prepare` runs once per step on the host and turns the step's `CascadeInput` into the backend's `Layout`,
    which every layer reuses (so a layer's launches need no device sync); `attend` runs once per layer.
    """

    name: str

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def prepare(self, step: CascadeInput) -> Layout:
        """The step's layout, made once on the host."""

    @abstractmethod
    def attend(
        self, layout: Layout, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        """q [N, Hq, D] and one layer's pool → (o float32 [N, Hq, D], lse float32 [N, Hq]): the own part and every
        prefix depth merged; a row nothing reaches has o = 0, lse = -inf."""
