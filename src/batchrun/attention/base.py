"""Cascade attention: the prefix part, the own part and the LSE merge, over a KV slot pool.

The interface the engine calls: the attention state and its merge, the contract's functions (run by the torch
backend: attention_plan pads the metadata into buckets, attention_run executes them), the backends and their
selector. LSE is in natural log throughout (as torch.logsumexp); an empty part is `o = 0, lse = -inf`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from batchrun.attention_plan import plan_own, plan_prefix
from batchrun.attention_run import run_plan


class AttentionState(NamedTuple):
    o: torch.Tensor  # float32 [rows, Hq, D]
    lse: torch.Tensor  # float32 [rows, Hq], natural log


# ---------------------------------------------------------------- merge


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


# ---------------------------------------------------------------- the contract's functional API


def prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    sm_scale: float,
) -> AttentionState:
    """Segment g's rows `q[q_start[g] : q_start[g] + q_len[g]]` attend non-causally to the slots
    `kv_indices[kv_indptr[g] : kv_indptr[g + 1]]`; q [N, Hq, D], k_cache/v_cache [num_slots, Hkv, D].

    Returns (o: float32 [sum(q_len), Hq, D], lse: float32 [sum(q_len), Hq]), rows in segment order."""
    plan = plan_prefix(
        q_start=_host(q_start),
        q_len=_host(q_len),
        kv_indices=_host(kv_indices),
        kv_indptr=_host(kv_indptr),
        group=q.shape[1] // k_cache.shape[1],
        device=q.device,
        dtype=torch.promote_types(q.dtype, torch.float32),
    )
    return AttentionState(*run_plan(plan, q, k_cache, v_cache, sm_scale=sm_scale))


def own_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    q_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    sm_scale: float,
) -> AttentionState:
    """Sequence s owns rows `q_indptr[s] : q_indptr[s + 1]` and the slots `kv_indices[kv_indptr[s] :
    kv_indptr[s + 1]]`; query i of q_len sees key j iff j <= kv_len - q_len + i.

    Returns (o: float32 [N, Hq, D], lse: float32 [N, Hq])."""
    plan = plan_own(
        q_indptr=_host(q_indptr),
        kv_indices=_host(kv_indices),
        kv_indptr=_host(kv_indptr),
        group=q.shape[1] // k_cache.shape[1],
        device=q.device,
        dtype=torch.promote_types(q.dtype, torch.float32),
    )
    return AttentionState(*run_plan(plan, q, k_cache, v_cache, sm_scale=sm_scale))


def _host(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# ---------------------------------------------------------------- backends


class AttentionBackend:
    """What the engine calls: `plan_*` once per step (host metadata in numpy), `prefix`/`own` per layer.

    The torch backend pads the ragged metadata into buckets when planning; a functional backend (the
    Triton kernels) keeps the ragged tensors and calls its module's contract functions."""

    name = "torch"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def plan_prefix(
        self, *, q_start: np.ndarray, q_len: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, group: int
    ) -> Any:
        return plan_prefix(
            q_start=q_start, q_len=q_len, kv_indices=kv_indices, kv_indptr=kv_indptr, group=group, device=self.device
        )

    def plan_own(self, *, q_indptr: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, group: int) -> Any:
        return plan_own(q_indptr=q_indptr, kv_indices=kv_indices, kv_indptr=kv_indptr, group=group, device=self.device)

    def prefix(
        self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        return AttentionState(*run_plan(plan, q, k_cache, v_cache, sm_scale=sm_scale))

    def own(
        self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        return AttentionState(*run_plan(plan, q, k_cache, v_cache, sm_scale=sm_scale))

    def merge_state_into(
        self,
        v: torch.Tensor,
        s: torch.Tensor,
        v_other: torch.Tensor,
        s_other: torch.Tensor,
        *,
        rows: torch.Tensor | slice,
    ) -> None:
        merge_state_into(v, s, v_other, s_other, rows=rows)


class TritonBackend(AttentionBackend):
    """The Triton kernels (batchrun.kernels): each step's plans are made once on the host, so the layers'
    launches need no device sync."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        import batchrun.kernels as kernels

        self.kernels = kernels
        self.name = "triton"

    def plan_prefix(
        self, *, q_start: np.ndarray, q_len: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, group: int
    ) -> Any:
        return self.kernels.plan_prefix(q_start=q_start, q_len=q_len, kv_indices=kv_indices, kv_indptr=kv_indptr,
                                        device=self.device)

    def plan_own(self, *, q_indptr: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, group: int) -> Any:
        return self.kernels.plan_own(q_indptr=q_indptr, kv_indices=kv_indices, kv_indptr=kv_indptr,
                                     device=self.device)

    def prefix(
        self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        return AttentionState(*self.kernels.run_planned(plan, q, k_cache, v_cache, sm_scale=sm_scale))

    def own(
        self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        return AttentionState(*self.kernels.run_planned(plan, q, k_cache, v_cache, sm_scale=sm_scale))

    def merge_state_into(
        self,
        v: torch.Tensor,
        s: torch.Tensor,
        v_other: torch.Tensor,
        s_other: torch.Tensor,
        *,
        rows: torch.Tensor | slice,
    ) -> None:
        if isinstance(rows, slice):
            rows = torch.arange(v.shape[0], device=v.device)[rows]
        self.kernels.merge_state_into(v, s, v_other, s_other, rows=rows)


def select_backend(device: torch.device) -> AttentionBackend:
    """The torch backend on CPU; the Triton kernels (batchrun.kernels) on CUDA when they import, else torch."""
    if device.type == "cuda":
        try:
            return TritonBackend(device)
        except ImportError:  # no triton for this platform: the torch path runs on CUDA too
            return AttentionBackend(device)
    return AttentionBackend(device)
