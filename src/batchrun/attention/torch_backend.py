"""The torch backend (the reference, and CUDA without Triton): each step's parts laid out into buckets
(torch_buckets), and per layer one padded batch of attention per bucket, by torch's fused CPU kernel when it has
one, else by matmuls; the prefix depths are merged into the own part's (o, lse).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from batchrun.attention.base import (
    AttentionBackend,
    AttentionState,
    CascadeInput,
    OwnPart,
    PrefixPart,
    merge_state_into,
)
from batchrun.attention.torch_buckets import Bucket, TorchPartLayout, layout_own, layout_prefix


def _fused_cpu_op() -> Any:
    """torch's CPU FlashAttention kernel, if this torch has it with masks: it returns the natural-log LSE
    too, never holds the whole score matrix, and reads strided q, k, v (the gathered KV needs no transpose)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    x = torch.zeros(1, 1, 2, 8)
    try:
        op(x, x, x, 0.0, False, attn_mask=torch.zeros(1, 1, 1, 2), scale=1.0)
    except (RuntimeError, TypeError):  # an older torch: no mask argument, or not for these shapes
        return None
    return op


_FUSED_CPU_OP = _fused_cpu_op()


class TorchStepLayout(NamedTuple):
    """A step laid out for the torch backend: the own part's buckets, and per prefix depth its buckets and the
    q rows its output merges into (a slice when they are contiguous)."""

    own: TorchPartLayout
    prefixes: tuple[tuple[TorchPartLayout, torch.Tensor | slice], ...]


class TorchBackend(AttentionBackend[TorchStepLayout]):
    """Pads each part's ragged metadata into buckets once per step, runs them per layer and merges the prefix
    depths into the own part's state; `compute_dtype` is the dtype of the masks, which the attention computes
    in: float32 for float32, bfloat16 and float16 pools."""

    name = "torch"

    def __init__(self, device: torch.device, *, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(device)
        self.compute_dtype = compute_dtype

    def prepare(self, step: CascadeInput) -> TorchStepLayout:
        own = _cover_rows(step.own, step.num_rows)
        own_layout = layout_own(q_indptr=own.q_indptr, kv_indices=own.kv_indices, kv_indptr=own.kv_indptr,
                                gqa_ratio=step.gqa_ratio, device=self.device, dtype=self.compute_dtype)
        prefixes = tuple(
            (
                layout_prefix(q_start=p.q_start, q_len=p.q_len, kv_indices=p.kv_indices, kv_indptr=p.kv_indptr,
                              gqa_ratio=step.gqa_ratio, device=self.device, dtype=self.compute_dtype),
                self._segment_rows(p),
            )
            for p in step.prefixes
        )
        return TorchStepLayout(own_layout, prefixes)

    def attend(
        self, layout: TorchStepLayout, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
        sm_scale: float,
    ) -> AttentionState:
        o, lse = run_layout(layout.own, q, k_cache, v_cache, sm_scale=sm_scale)
        for part, rows in layout.prefixes:
            o_p, lse_p = run_layout(part, q, k_cache, v_cache, sm_scale=sm_scale)
            merge_state_into(o, lse, o_p, lse_p, rows=rows)
        return AttentionState(o, lse)

    def _segment_rows(self, part: PrefixPart) -> torch.Tensor | slice:
        """The q rows of a prefix part's segments in segment order (its layout's output rows)."""
        q_start, q_len = np.asarray(part.q_start, np.int64), np.asarray(part.q_len, np.int64)
        if len(q_start) and np.array_equal(q_start[1:], q_start[:-1] + q_len[:-1]):
            return slice(int(q_start[0]), int(q_start[-1] + q_len[-1]))
        ranges = [np.arange(s, s + n) for s, n in zip(q_start.tolist(), q_len.tolist(), strict=True)]
        rows = np.concatenate([np.zeros(0, np.int64), *ranges])
        return torch.from_numpy(rows).to(self.device)


def _cover_rows(own: OwnPart, num_rows: int) -> OwnPart:
    """The own part with the step's rows it leaves out (before its first, after its last) as sequences without
    keys, so that its layout's output has a state for every row."""
    q_indptr, kv_indptr = np.asarray(own.q_indptr, np.int64), np.asarray(own.kv_indptr, np.int64)
    assert 0 <= q_indptr[0] and q_indptr[-1] <= num_rows, "own rows must lie within the step"
    is_head, is_tail = bool(q_indptr[0] > 0), bool(q_indptr[-1] < num_rows)
    return OwnPart(
        np.r_[[0] * is_head, q_indptr, [num_rows] * is_tail].astype(np.int64),
        np.asarray(own.kv_indices, np.int64),
        np.r_[kv_indptr[:1].tolist() * is_head, kv_indptr, kv_indptr[-1:].tolist() * is_tail].astype(np.int64),
    )


def run_layout(
    layout: TorchPartLayout,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    sm_scale: float,
) -> AttentionState:
    """Runs a laid-out part: q [N, Hq, D], k_cache/v_cache [num_slots, Hkv, D] → (o, lse) over its rows."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    if layout.is_direct:
        return AttentionState(*_bucket_attention(layout.buckets[0], q, k_cache, v_cache, sm_scale, compute_dtype))
    if layout.is_covered:
        o = q.new_empty((layout.num_rows, num_q_heads, head_dim), dtype=compute_dtype)
        lse = q.new_empty((layout.num_rows, num_q_heads), dtype=compute_dtype)
    else:
        o = q.new_zeros((layout.num_rows, num_q_heads, head_dim), dtype=compute_dtype)
        lse = q.new_full((layout.num_rows, num_q_heads), -math.inf, dtype=compute_dtype)
    for bucket in layout.buckets:
        o_b, lse_b = _bucket_attention(bucket, q, k_cache, v_cache, sm_scale, compute_dtype)
        if bucket.src_idx is not None:
            o_b, lse_b = o_b.index_select(0, bucket.src_idx), lse_b.index_select(0, bucket.src_idx)
        if bucket.out_idx is None:
            o.narrow(0, bucket.out_row0, o_b.shape[0]).copy_(o_b)
            lse.narrow(0, bucket.out_row0, o_b.shape[0]).copy_(lse_b)
        else:
            o.index_copy_(0, bucket.out_idx, o_b)
            lse.index_copy_(0, bucket.out_idx, lse_b)
    return AttentionState(o, lse)


def _bucket_attention(
    b: Bucket,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sm_scale: float,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One padded bucket → (o [n * Qmax, Hq, D], lse [n * Qmax, Hq]). Query rows x the GQA heads of a KV head
    are stacked into one matrix per segment, which meets the segment's KV once."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    gqa_ratio = num_q_heads // num_kv_heads
    rows = b.n * b.max_q
    qb = q.narrow(0, b.q_row0, rows) if b.q_idx is None else q.index_select(0, b.q_idx)  # [n * Qmax, Hq, D]
    if b.max_q == 1:
        qb = qb.view(b.n, num_kv_heads, gqa_ratio, head_dim)  # a view: rows are already (KV head, query head)
    else:  # [n, Qmax, Hkv, G, D] → [n, Hkv, Qmax * G, D]  (G = gqa_ratio)
        qb = qb.view(b.n, b.max_q, num_kv_heads, gqa_ratio, head_dim).transpose(1, 2)
        qb = qb.reshape(b.n, num_kv_heads, b.max_q * gqa_ratio, head_dim)
    if b.kv_idx is None:  # one segment over consecutive slots: a view of the pool, no gather
        kb, vb = k_cache.narrow(0, b.kv_slot0, b.max_k), v_cache.narrow(0, b.kv_slot0, b.max_k)
    else:
        kb, vb = k_cache.index_select(0, b.kv_idx), v_cache.index_select(0, b.kv_idx)
    # [n, Kmax, Hkv, D] → [n, Hkv, Kmax, D] (strided views)
    kb = kb.view(b.n, b.max_k, num_kv_heads, head_dim).transpose(1, 2).to(compute_dtype)
    vb = vb.view(b.n, b.max_k, num_kv_heads, head_dim).transpose(1, 2).to(compute_dtype)
    qb = qb.to(compute_dtype)
    if _FUSED_CPU_OP is not None and q.device.type == "cpu":
        o, lse = _FUSED_CPU_OP(qb, kb, vb, 0.0, False, attn_mask=b.mask, scale=sm_scale)
    else:
        o, lse = _matmul_attention(qb, kb, vb, b.mask, sm_scale)
    # [n, Hkv, Qmax * G, D] → [n * Qmax, Hq, D];  [n, Hkv, Qmax * G] → [n * Qmax, Hq]
    if b.max_q == 1:
        return o.reshape(rows, num_q_heads, head_dim), lse.reshape(rows, num_q_heads)
    o = o.view(b.n, num_kv_heads, b.max_q, gqa_ratio, head_dim).transpose(1, 2).reshape(rows, num_q_heads, head_dim)
    lse = lse.view(b.n, num_kv_heads, b.max_q, gqa_ratio).transpose(1, 2).reshape(rows, num_q_heads)
    return o, lse


def _matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused fallback (CUDA without Triton): q [n, Hkv, R, D], k/v [n, Hkv, K, D] → o, lse [n, Hkv, R]."""
    scores = torch.matmul(q * sm_scale, k.transpose(-1, -2))  # [n, Hkv, R, K]
    if mask is not None:
        scores.add_(mask)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    # exp(s - lse) is already normalised; the layout leaves out rows that see no key, so lse is finite.
    o = torch.matmul(scores.sub_(lse).exp_(), v)
    return o, lse.squeeze(-1)
