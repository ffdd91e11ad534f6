"""Cascade attention: the prefix part, the own part and the LSE merge, over a KV slot pool.

The torch backend (CPU, and the reference for the Triton kernels) lives here, with the backend selector the
engine calls. LSE is in natural log throughout (as torch.logsumexp); an empty part is `o = 0, lse = -inf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch

# Own-part segments longer than this are split into causal blocks of this many query rows: each block reads
# only the keys it can see (about half the work of a full square) and its scores stay small.
Q_BLOCK = 256
# Segments are padded into buckets; a bucket may waste up to this factor in padded score elements and in
# padded (gathered) KV rows, plus a constant allowance: a few padded elements cost less than another round of
# per-bucket torch ops.
PAD_WASTE = 1.5
PAD_SLACK_SCORES = 1 << 14
PAD_SLACK_ROWS = 1 << 10
# Segments over at least this many consecutive slots are read in place rather than gathered into a bucket
# (below it, one more torch call per segment costs more than the gather it saves).
VIEW_MIN_KV_LEN = 512


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


# ---------------------------------------------------------------- torch backend: planning (host, numpy)


@dataclass(frozen=True)
class _Bucket:
    """Segments padded to one shape [n, Qmax] x [n, Kmax]; tensors are on the compute device."""

    n: int
    max_q: int
    max_k: int
    q_idx: torch.Tensor | None  # int64 [n * Qmax]: rows of q (padding repeats a valid row); None: q_row0 + arange
    q_row0: int
    kv_idx: torch.Tensor | None  # int64 [n * Kmax]: slots (padding repeats a valid slot); None: kv_slot0 + arange
    kv_slot0: int
    mask: torch.Tensor | None  # [n, 1, Qmax * G or 1, Kmax]: 0 where a query row sees a key, -inf elsewhere
    src_idx: torch.Tensor | None  # int64 [num_valid]: valid rows of the flattened [n * Qmax]; None: all valid
    out_idx: torch.Tensor | None  # int64 [num_valid]: output rows of those; None: out_row0 + arange
    out_row0: int


@dataclass(frozen=True)
class TorchAttentionPlan:
    """One attention part of one step, planned once on the host and reused by every layer."""

    num_rows: int  # output rows
    buckets: tuple[_Bucket, ...]
    is_direct: bool  # one bucket, no padding, output rows in order: its result is the output as is
    is_covered: bool  # every output row comes from a bucket (none keeps the empty state)


def plan_prefix(
    *,
    q_start: np.ndarray,
    q_len: np.ndarray,
    kv_indices: np.ndarray,
    kv_indptr: np.ndarray,
    group: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> TorchAttentionPlan:
    """Plans `prefix_attention` (non-causal); output rows are the segments' rows in segment order.
    `group` is the number of query heads per KV head; `dtype` the compute dtype of the masks."""
    q_start, q_len = np.asarray(q_start, np.int64), np.asarray(q_len, np.int64)
    out_start = np.zeros_like(q_len)
    np.cumsum(q_len[:-1], out=out_start[1:])
    return _plan(
        q_start=q_start,
        q_len=q_len,
        out_start=out_start,
        num_rows=int(q_len.sum()),
        kv_indices=np.asarray(kv_indices, np.int64),
        kv_indptr=np.asarray(kv_indptr, np.int64),
        is_causal=False,
        group=group,
        device=device,
        dtype=dtype,
    )


def plan_own(
    *,
    q_indptr: np.ndarray,
    kv_indices: np.ndarray,
    kv_indptr: np.ndarray,
    group: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> TorchAttentionPlan:
    """Plans `own_attention` (causal, aligned to the end of each sequence's KV); rows stay in place."""
    q_indptr = np.asarray(q_indptr, np.int64)
    q_start, q_len = q_indptr[:-1], np.diff(q_indptr)
    return _plan(
        q_start=q_start,
        q_len=q_len,
        out_start=q_start,
        num_rows=int(q_indptr[-1]),
        kv_indices=np.asarray(kv_indices, np.int64),
        kv_indptr=np.asarray(kv_indptr, np.int64),
        is_causal=True,
        group=group,
        device=device,
        dtype=dtype,
    )


def _plan(
    *,
    q_start: np.ndarray,
    q_len: np.ndarray,
    out_start: np.ndarray,
    num_rows: int,
    kv_indices: np.ndarray,
    kv_indptr: np.ndarray,
    is_causal: bool,
    group: int,
    device: torch.device,
    dtype: torch.dtype,
) -> TorchAttentionPlan:
    kv_start, kv_len = kv_indptr[:-1], np.diff(kv_indptr)
    assert len(q_start) == len(q_len) == len(kv_len), "one KV range per query segment"
    if is_causal:
        # Rows that see no key (q_len > kv_len) are left out: they keep o = 0, lse = -inf.
        num_blind = np.clip(q_len - kv_len, 0, None)
        q_start, out_start, q_len = q_start + num_blind, out_start + num_blind, q_len - num_blind
        q_start, q_len, out_start, kv_start, kv_len = _split_causal(q_start, q_len, out_start, kv_start, kv_len)
    seg = np.flatnonzero((q_len > 0) & (kv_len > 0))
    # A long segment over consecutive slots runs alone: the pool is read in place (a view), not gathered.
    breaks = np.r_[0, np.cumsum(np.diff(kv_indices) != 1)] if len(kv_indices) else np.zeros(1, np.int64)
    is_run = breaks[np.maximum(kv_start + kv_len - 1, 0)] == breaks[np.minimum(kv_start, len(breaks) - 1)]
    is_alone = is_run & (kv_len >= VIEW_MIN_KV_LEN)
    groups = [np.array([i]) for i in seg[is_alone[seg]]] + _group_segments(seg[~is_alone[seg]], q_len, kv_len)
    made = [
        _make_bucket(
            q_start[b], q_len[b], out_start[b], kv_start[b], kv_len[b], kv_indices,
            is_causal=is_causal, group=group, device=device, dtype=dtype,
        )
        for b in groups
    ]
    # Direct: the only bucket has no padded row and its rows are the output's rows in order.
    is_direct = len(made) == 1 and made[0][1] is None and np.array_equal(made[0][2], np.arange(num_rows))
    is_covered = sum(len(b[2]) for b in made) == num_rows
    return TorchAttentionPlan(
        num_rows=num_rows, buckets=tuple(b[0] for b in made), is_direct=is_direct, is_covered=is_covered
    )


def _split_causal(
    q_start: np.ndarray, q_len: np.ndarray, out_start: np.ndarray, kv_start: np.ndarray, kv_len: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Splits causal segments into blocks of at most Q_BLOCK rows; block b sees the keys up to its last row."""
    num_blocks = np.maximum((q_len + Q_BLOCK - 1) // Q_BLOCK, 1)
    if np.all(num_blocks == 1):
        return q_start, q_len, out_start, kv_start, kv_len
    seg = np.repeat(np.arange(len(q_len)), num_blocks)
    first_block = np.repeat(np.cumsum(num_blocks) - num_blocks, num_blocks)
    row0 = (np.arange(len(seg)) - first_block) * Q_BLOCK  # block's first row within its segment
    block_len = np.minimum(q_len[seg] - row0, Q_BLOCK)
    # Row i of the segment sees keys j <= kv_len - q_len + i; the block ends at row row0 + block_len - 1.
    block_kv_len = np.clip(kv_len[seg] - q_len[seg] + row0 + block_len, 0, kv_len[seg])
    return q_start[seg] + row0, block_len, out_start[seg] + row0, kv_start[seg], block_kv_len


def _group_segments(seg: np.ndarray, q_len: np.ndarray, kv_len: np.ndarray) -> list[np.ndarray]:
    """Greedy buckets over segments sorted by size, closing a bucket when padding would waste too much
    (padded score elements, or padded KV rows, which are gathered)."""
    if len(seg) == 0:
        return []
    order = seg[np.lexsort((-kv_len[seg], -q_len[seg]))]
    buckets: list[np.ndarray] = []
    start, max_q, max_k, real_scores, real_rows = 0, 0, 0, 0, 0
    for i, s in enumerate(order.tolist()):
        q, k = int(q_len[s]), int(kv_len[s])
        new_max_q, new_max_k, n = max(max_q, q), max(max_k, k), i + 1 - start
        is_wasteful = (
            n * new_max_q * new_max_k > PAD_WASTE * (real_scores + q * k) + PAD_SLACK_SCORES
            or n * new_max_k > PAD_WASTE * (real_rows + k) + PAD_SLACK_ROWS
        )
        if i > start and is_wasteful:
            buckets.append(order[start:i])
            start, new_max_q, new_max_k, real_scores, real_rows = i, q, k, 0, 0
        max_q, max_k = new_max_q, new_max_k
        real_scores, real_rows = real_scores + q * k, real_rows + k
    buckets.append(order[start:])
    return [np.sort(b) for b in buckets]


def _make_bucket(
    q_start: np.ndarray,
    q_len: np.ndarray,
    out_start: np.ndarray,
    kv_start: np.ndarray,
    kv_len: np.ndarray,
    kv_indices: np.ndarray,
    *,
    is_causal: bool,
    group: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[_Bucket, np.ndarray | None, np.ndarray]:
    """The bucket, and on the host its valid-row index (None: all valid) and output rows."""
    n, max_q, max_k = len(q_len), int(q_len.max()), int(kv_len.max())
    qi, kj = np.arange(max_q), np.arange(max_k)
    q_valid = qi[None, :] < q_len[:, None]  # [n, Qmax]
    q_idx = (q_start[:, None] + np.minimum(qi[None, :], q_len[:, None] - 1)).reshape(-1)
    kv_idx = kv_indices[kv_start[:, None] + np.minimum(kj[None, :], kv_len[:, None] - 1)].reshape(-1)
    sees = kj[None, None, :] < kv_len[:, None, None]  # [n, 1, Kmax]
    if is_causal and max_q > 1:
        sees = sees & (kj[None, None, :] <= (kv_len - q_len)[:, None, None] + qi[None, :, None])  # [n, Qmax, Kmax]
    mask = None
    if not sees.all():
        # Query rows are stacked as (row, head in group): a row's mask repeats for its group of heads.
        rows = np.repeat(sees, group, axis=1) if sees.shape[1] > 1 else sees
        mask = torch.from_numpy(np.where(rows, 0.0, -np.inf)[:, None]).to(device=device, dtype=dtype)
    src_idx = None if q_valid.all() else np.flatnonzero(q_valid)
    out_idx = (out_start[:, None] + qi[None, :])[q_valid]
    is_q_range = _is_range(q_idx)
    is_out_range = src_idx is None and _is_range(out_idx)
    is_kv_range = n == 1 and _is_range(kv_idx)

    def to_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    bucket = _Bucket(
        n=n,
        max_q=max_q,
        max_k=max_k,
        q_idx=None if is_q_range else to_dev(q_idx),
        q_row0=int(q_idx[0]),
        kv_idx=None if is_kv_range else to_dev(kv_idx),
        kv_slot0=int(kv_idx[0]),
        mask=mask,
        src_idx=None if src_idx is None else to_dev(src_idx),
        out_idx=None if is_out_range else to_dev(out_idx),
        out_row0=int(out_idx[0]),
    )
    return bucket, src_idx, out_idx


def _is_range(idx: np.ndarray) -> bool:
    return bool(idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1))


# ---------------------------------------------------------------- torch backend: running (per layer)


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


def run_plan(
    plan: TorchAttentionPlan,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    sm_scale: float,
) -> AttentionState:
    """Runs a planned part: q [N, Hq, D], k_cache/v_cache [num_slots, Hkv, D] → (o, lse) over the plan's rows."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    if plan.is_direct:
        return _bucket_attention(plan.buckets[0], q, k_cache, v_cache, sm_scale, compute_dtype)
    if plan.is_covered:
        o = q.new_empty((plan.num_rows, num_q_heads, head_dim), dtype=compute_dtype)
        lse = q.new_empty((plan.num_rows, num_q_heads), dtype=compute_dtype)
    else:
        o = q.new_zeros((plan.num_rows, num_q_heads, head_dim), dtype=compute_dtype)
        lse = q.new_full((plan.num_rows, num_q_heads), -math.inf, dtype=compute_dtype)
    for bucket in plan.buckets:
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
    b: _Bucket,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sm_scale: float,
    compute_dtype: torch.dtype,
) -> AttentionState:
    """One padded bucket → (o [n * Qmax, Hq, D], lse [n * Qmax, Hq]). Query rows x the GQA heads of a KV head
    are stacked into one matrix per segment, which meets the segment's KV once."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    rows = b.n * b.max_q
    qb = q.narrow(0, b.q_row0, rows) if b.q_idx is None else q.index_select(0, b.q_idx)  # [n * Qmax, Hq, D]
    if b.max_q == 1:
        qb = qb.view(b.n, num_kv_heads, group, head_dim)  # a view: rows are already (head-group, head)
    else:  # [n, Qmax, Hkv, G, D] → [n, Hkv, Qmax * G, D]
        qb = qb.view(b.n, b.max_q, num_kv_heads, group, head_dim).transpose(1, 2)
        qb = qb.reshape(b.n, num_kv_heads, b.max_q * group, head_dim)
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
        return AttentionState(o.reshape(rows, num_q_heads, head_dim), lse.reshape(rows, num_q_heads))
    o = o.view(b.n, num_kv_heads, b.max_q, group, head_dim).transpose(1, 2).reshape(rows, num_q_heads, head_dim)
    lse = lse.view(b.n, num_kv_heads, b.max_q, group).transpose(1, 2).reshape(rows, num_q_heads)
    return AttentionState(o, lse)


def _matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused fallback (CUDA without Triton): q [n, Hkv, R, D], k/v [n, Hkv, K, D] → o, lse [n, Hkv, R]."""
    scores = torch.matmul(q * sm_scale, k.transpose(-1, -2))  # [n, Hkv, R, K]
    if mask is not None:
        scores.add_(mask)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    # exp(s - lse) is already normalised; the plan leaves out rows that see no key, so lse is finite.
    o = torch.matmul(scores.sub_(lse).exp_(), v)
    return o, lse.squeeze(-1)


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
    return run_plan(plan, q, k_cache, v_cache, sm_scale=sm_scale)


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
    return run_plan(plan, q, k_cache, v_cache, sm_scale=sm_scale)


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
        return run_plan(plan, q, k_cache, v_cache, sm_scale=sm_scale)

    def own(
        self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        return run_plan(plan, q, k_cache, v_cache, sm_scale=sm_scale)

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


class FunctionalBackend(AttentionBackend):
    """A module exposing the contract's four functions (batchrun.kernels); plans are its ragged tensors."""

    def __init__(self, module: ModuleType, device: torch.device, *, name: str) -> None:
        super().__init__(device)
        self.module = module
        self.name = name

    def _tensors(self, **arrays: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(self.device) for k, a in arrays.items()}

    def plan_prefix(
        self, *, q_start: np.ndarray, q_len: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, group: int
    ) -> Any:
        return self._tensors(q_start=q_start, q_len=q_len, kv_indices=kv_indices, kv_indptr=kv_indptr)

    def plan_own(self, *, q_indptr: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, group: int) -> Any:
        return self._tensors(q_indptr=q_indptr, kv_indices=kv_indices, kv_indptr=kv_indptr)

    def prefix(
        self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        o, lse = self.module.prefix_attention(q, k_cache, v_cache, sm_scale=sm_scale, **plan)
        return AttentionState(o, lse)

    def own(
        self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
    ) -> AttentionState:
        o, lse = self.module.own_attention(q, k_cache, v_cache, sm_scale=sm_scale, **plan)
        return AttentionState(o, lse)

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
        self.module.merge_state_into(v, s, v_other, s_other, rows=rows)


def select_backend(device: torch.device) -> AttentionBackend:
    """The torch backend on CPU; the Triton kernels (batchrun.kernels) on CUDA when they import, else torch."""
    if device.type == "cuda":
        try:
            import batchrun.kernels as kernels
        except ImportError:
            return AttentionBackend(device)
        if all(hasattr(kernels, f) for f in ("prefix_attention", "own_attention", "merge_state_into")):
            return FunctionalBackend(kernels, device, name="triton")
    return AttentionBackend(device)
