"""The torch backend's layout: a step's ragged attention metadata padded into buckets of like-sized segments,
computed once on the host (numpy) per step and reused by every layer (torch_backend.run_layout executes it).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Bucket:
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
class TorchPartLayout:
    """One attention part of one step, laid out once on the host and reused by every layer."""

    num_rows: int  # output rows
    buckets: tuple[Bucket, ...]
    is_direct: bool  # one bucket, no padding, output rows in order: its result is the output as is
    is_covered: bool  # every output row comes from a bucket (none keeps the empty state)


def layout_prefix(
    *,
    q_start: np.ndarray,
    q_len: np.ndarray,
    kv_indices: np.ndarray,
    kv_indptr: np.ndarray,
    gqa_ratio: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> TorchPartLayout:
    """Lays out a prefix part (non-causal); output rows are the segments' rows in segment order.
    `gqa_ratio` is the number of query heads per KV head; `dtype` the compute dtype of the masks."""
    q_start, q_len = np.asarray(q_start, np.int64), np.asarray(q_len, np.int64)
    out_start = np.zeros_like(q_len)
    np.cumsum(q_len[:-1], out=out_start[1:])
    return _layout(
        q_start=q_start,
        q_len=q_len,
        out_start=out_start,
        num_rows=int(q_len.sum()),
        kv_indices=np.asarray(kv_indices, np.int64),
        kv_indptr=np.asarray(kv_indptr, np.int64),
        is_causal=False,
        gqa_ratio=gqa_ratio,
        device=device,
        dtype=dtype,
    )


def layout_own(
    *,
    q_indptr: np.ndarray,
    kv_indices: np.ndarray,
    kv_indptr: np.ndarray,
    gqa_ratio: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> TorchPartLayout:
    """Lays out the own part (causal, aligned to the end of each sequence's KV); rows stay in place."""
    q_indptr = np.asarray(q_indptr, np.int64)
    q_start, q_len = q_indptr[:-1], np.diff(q_indptr)
    return _layout(
        q_start=q_start,
        q_len=q_len,
        out_start=q_start,
        num_rows=int(q_indptr[-1]),
        kv_indices=np.asarray(kv_indices, np.int64),
        kv_indptr=np.asarray(kv_indptr, np.int64),
        is_causal=True,
        gqa_ratio=gqa_ratio,
        device=device,
        dtype=dtype,
    )


def _layout(
    *,
    q_start: np.ndarray,
    q_len: np.ndarray,
    out_start: np.ndarray,
    num_rows: int,
    kv_indices: np.ndarray,
    kv_indptr: np.ndarray,
    is_causal: bool,
    gqa_ratio: int,
    device: torch.device,
    dtype: torch.dtype,
) -> TorchPartLayout:
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
    members = [np.array([i]) for i in seg[is_alone[seg]]] + _bucket_segments(seg[~is_alone[seg]], q_len, kv_len)
    made = [
        _make_bucket(
            q_start[b], q_len[b], out_start[b], kv_start[b], kv_len[b], kv_indices,
            is_causal=is_causal, gqa_ratio=gqa_ratio, device=device, dtype=dtype,
        )
        for b in members
    ]
    # Direct: the only bucket has no padded row and its rows are the output's rows in order.
    is_direct = len(made) == 1 and made[0][1] is None and np.array_equal(made[0][2], np.arange(num_rows))
    is_covered = sum(len(b[2]) for b in made) == num_rows
    return TorchPartLayout(
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


def _bucket_segments(seg: np.ndarray, q_len: np.ndarray, kv_len: np.ndarray) -> list[np.ndarray]:
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
    gqa_ratio: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Bucket, np.ndarray | None, np.ndarray]:
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
        # Query rows are stacked as (row, query head of the KV head): a row's mask repeats for its gqa_ratio heads.
        rows = np.repeat(sees, gqa_ratio, axis=1) if sees.shape[1] > 1 else sees
        mask = torch.from_numpy(np.where(rows, 0.0, -np.inf)[:, None]).to(device=device, dtype=dtype)
    src_idx = None if q_valid.all() else np.flatnonzero(q_valid)
    out_idx = (out_start[:, None] + qi[None, :])[q_valid]
    is_q_range = _is_range(q_idx)
    is_out_range = src_idx is None and _is_range(out_idx)
    is_kv_range = n == 1 and _is_range(kv_idx)

    def to_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    bucket = Bucket(
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
