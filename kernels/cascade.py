"""Triton cascade attention over a KV pool addressed by slot indices: the prefix part (non-causal; a segment's
query rows times the query heads of one KV head form one tile, so the prefix is read once per segment and KV
head) and the own part (causal per sequence). Both return float32 (o, lse), the LSE in natural log."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .merge import merge_splits

# The interpreter's tl.dot on bf16 returns garbage (Triton issue #11584), so tiles are upcast to fp32 there.
# Read once, as triton.jit decides at decoration time whether kernels are interpreted.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = math.log2(math.e)
_HEAD_DIMS = (64, 80, 96, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A split covers at least this many keys, so the merge of the partials stays cheap next to the attention.
_MIN_KEYS_PER_SPLIT = 256


@triton.jit
def _attend_keys(
    acc, m_i, l_i, q, q_limit, k_ptr, v_ptr, kv_indices_ptr, kv_lo, kv_hi, kv_head,
    stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax in base 2 of the tile q: [BLOCK_M, BLOCK_D] over keys kv_lo <= j < kv_hi of one segment
    (pool slots kv_indices_ptr[j]); under IS_CAUSAL row r sees key j only if j <= q_limit[r].
    Returns the updated state: acc [BLOCK_M, BLOCK_D] (unnormalised), running max m_i, sum l_i [BLOCK_M]."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for start in range(kv_lo, kv_hi, BLOCK_N):
        j = start + offs_n
        j_mask = j < kv_hi
        # int64: slot * stride exceeds 2**31 in pools of a few GB.
        slot = tl.load(kv_indices_ptr + j, mask=j_mask, other=0).to(tl.int64)
        k_t = tl.load(
            k_ptr + slot[None, :] * stride_kn + kv_head * stride_kh + offs_d[:, None],
            mask=d_mask[:, None] & j_mask[None, :], other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        v = tl.load(
            v_ptr + slot[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
            mask=j_mask[:, None] & d_mask[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            k_t = k_t.to(tl.float32)
        # ieee: an fp32 dot would otherwise run as TF32 on GPU; fp16/bf16 dots ignore the option.
        s = tl.dot(q, k_t, input_precision="ieee") * qk_scale
        is_visible = j_mask[None, :]
        if IS_CAUSAL:
            is_visible = is_visible & (j[None, :] <= q_limit[:, None])
        s = tl.where(is_visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet has m_new = -inf; -inf - -inf would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # Round p to the storage dtype as the GPU dot does, then upcast in the interpreter only.
        p = p.to(v.dtype)
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _cascade_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    q_start_ptr, q_len_ptr, out_start_ptr, kv_indices_ptr, kv_indptr_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_os, stride_on, stride_oh, stride_ls, stride_ln, stride_lh,
    qk_scale, keys_per_split, num_m_tiles,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (segments * m_tiles, kv_heads, splits). Tile row r is query token r // GROUP of the segment with
    query head kv_head * GROUP + r % GROUP: the GQA group's heads are stacked so one KV read serves them all.
    m_tile is the fastest axis so the tiles that read the same keys run together and share L2."""
    seg = tl.program_id(0) // num_m_tiles
    m_tile = tl.program_id(0) % num_m_tiles
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_len = tl.load(q_len_ptr + seg)
    if m_tile * BLOCK_M >= q_len * GROUP:
        return
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = tok < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_row = (tl.load(q_start_ptr + seg) + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    kv_start = tl.load(kv_indptr_ptr + seg)
    kv_len = tl.load(kv_indptr_ptr + seg + 1) - kv_start
    q_limit = kv_len - q_len + tok  # causal: the last key query token `tok` may see
    kv_lo = split * keys_per_split
    kv_hi = tl.minimum(kv_len, kv_lo + keys_per_split)
    if IS_CAUSAL:
        # Keys after the tile's last visible one are masked for every row: skip their blocks.
        last_tok = tl.minimum(q_len - 1, (m_tile * BLOCK_M + BLOCK_M - 1) // GROUP)
        kv_hi = tl.minimum(kv_hi, kv_len - q_len + last_tok + 1)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, q_limit, k_ptr, v_ptr, kv_indices_ptr + kv_start, kv_lo, kv_hi, kv_head,
        stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, IS_CAUSAL, UPCAST,
    )

    # An empty range (no key, or all masked) leaves l_i = 0: write the empty state o = 0, lse = -inf.
    is_empty = l_i == 0.0
    l_safe = tl.where(is_empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(is_empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # base 2 -> e
    out_row = (tl.load(out_start_ptr + seg) + tok).to(tl.int64)
    split_off = split.to(tl.int64)
    tl.store(
        o_ptr + split_off * stride_os + out_row[:, None] * stride_on + head[:, None] * stride_oh
        + offs_d[None, :],
        o, mask=row_mask[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + split_off * stride_ls + out_row * stride_ln + head * stride_lh, lse, mask=row_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and split count; None picks them from the shapes and the device."""

    block_m: int | None = None
    block_n: int | None = None
    num_splits: int | None = None


@dataclass(frozen=True)
class AttentionPlan:
    """One launch's metadata on the device plus the host-side maxima its grid needs. Made once per engine
    step from host arrays (`plan_prefix`, `plan_own`) and reused by every layer: no device sync per call."""

    q_start: torch.Tensor
    q_len: torch.Tensor
    out_start: torch.Tensor
    kv_indices: torch.Tensor
    kv_indptr: torch.Tensor
    num_out_rows: int
    max_q_len: int
    max_kv_len: int
    is_covered: bool  # every output row belongs to a segment (else rows outside start empty)
    is_causal: bool  # the own part; the prefix part is not causal


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *index: torch.Tensor
) -> None:
    assert q.dtype in _DTYPES, f"q dtype {q.dtype} is not fp16, bf16 or fp32"
    assert k_cache.dtype == v_cache.dtype == q.dtype, "q, k_cache and v_cache must share one dtype"
    assert q.dim() == 3 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape, (
        "q is [N, Hq, D]; k_cache and v_cache are [num_slots, Hkv, D]"
    )
    head_dim, num_kv_heads = q.shape[2], k_cache.shape[1]
    assert head_dim in _HEAD_DIMS and k_cache.shape[2] == head_dim, f"head size {head_dim}: not {_HEAD_DIMS}"
    assert q.shape[1] % num_kv_heads == 0 and q.shape[1] // num_kv_heads in (1, 2, 4, 8), (
        f"GQA ratio {q.shape[1]} / {num_kv_heads} not in (1, 2, 4, 8)"
    )
    # The kernel assumes a unit stride over D (one vector load per row); other strides are free.
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "D must be contiguous"
    for t in index:
        assert t.dtype in (torch.int32, torch.int64), "index tensors are int32 or int64"
        assert t.dim() == 1 and t.is_contiguous(), "index tensors are contiguous 1-D"
        assert t.device == q.device == k_cache.device == v_cache.device, "all tensors on one device"


def _pick_config(
    config: LaunchConfig, seg: AttentionPlan, q: torch.Tensor, group: int, num_kv_heads: int
) -> tuple[int, int, int, int]:
    """Returns (block_m, block_n, num_splits, keys_per_split)."""
    # 128-row tiles halve the re-reads of a long prefix by a large group; fp32 (ieee, no tensor cores) and
    # decode (a few rows) keep small tiles.
    max_rows = seg.max_q_len * group
    is_fp32 = q.dtype == torch.float32
    block_m = config.block_m
    if block_m is None:
        block_m = 128 if max_rows >= 128 and not is_fp32 else min(64, max(16, triton.next_power_of_2(max_rows)))
    block_n = config.block_n or (32 if is_fp32 else 64)
    # The GPU compiler refuses dots under 16; the interpreter would silently accept them.
    assert block_m >= 16 and block_n >= 16, f"block sizes must be >= 16, got {block_m}, {block_n}"
    assert block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0, "block sizes are powers of two"
    num_m_tiles = triton.cdiv(seg.max_q_len * group, block_m)
    num_splits = config.num_splits
    if num_splits is None:
        # Split the keys only when the grid would not fill the GPU (about two programs per SM).
        num_programs = seg.q_len.shape[0] * num_m_tiles * num_kv_heads
        target = 1 if _INTERPRET or not q.is_cuda else 2 * _num_sms(q.device.index or 0)
        max_splits = triton.cdiv(seg.max_kv_len, max(block_n, _MIN_KEYS_PER_SPLIT))
        num_splits = max(1, min(triton.cdiv(target, num_programs), max_splits))
    assert num_splits >= 1, "num_splits must be >= 1"
    keys_per_split = triton.cdiv(triton.cdiv(max(seg.max_kv_len, 1), num_splits), block_n) * block_n
    return block_m, block_n, num_splits, keys_per_split


def run_planned(
    plan: AttentionPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix or own part (as `plan` says) of q against the pool: (o, lse) as in the public functions."""
    _check_inputs(q, k_cache, v_cache, plan.q_start, plan.q_len, plan.kv_indices, plan.kv_indptr)
    assert not plan.is_causal or plan.num_out_rows == q.shape[0], "an own-part plan covers the rows of q"
    return _attention(q, k_cache, v_cache, plan, sm_scale, config or LaunchConfig())


def _attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: AttentionPlan, sm_scale: float,
    config: LaunchConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    shape_o, shape_lse = (seg.num_out_rows, num_heads, head_dim), (seg.num_out_rows, num_heads)
    # No query or no key anywhere: every row is empty (and an empty pool would hand Triton a null pointer).
    if seg.max_q_len == 0 or seg.max_kv_len == 0:
        empty_lse = q.new_full(shape_lse, -math.inf, dtype=torch.float32)
        return q.new_zeros(shape_o, dtype=torch.float32), empty_lse
    block_m, block_n, num_splits, keys_per_split = _pick_config(config, seg, q, group, num_kv_heads)
    num_m_tiles = triton.cdiv(seg.max_q_len * group, block_m)
    # Rows outside every segment are never written: start them empty so they (and the merge) read 0 / -inf.
    if seg.is_covered:
        o = q.new_empty((num_splits, *shape_o), dtype=torch.float32)
        lse = q.new_empty((num_splits, *shape_lse), dtype=torch.float32)
    else:
        o = q.new_zeros((num_splits, *shape_o), dtype=torch.float32)
        lse = q.new_full((num_splits, *shape_lse), -math.inf, dtype=torch.float32)
    grid = (seg.q_len.shape[0] * num_m_tiles, num_kv_heads, num_splits)
    _cascade_attention_kernel[grid](
        q, k_cache, v_cache, o, lse,
        seg.q_start, seg.q_len, seg.out_start, seg.kv_indices, seg.kv_indptr,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        sm_scale * _LOG2E, keys_per_split, num_m_tiles,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), IS_CAUSAL=seg.is_causal, UPCAST=_INTERPRET,
        num_warps=4 if block_m * block_n <= 64 * 64 else 8,
    )
    if num_splits == 1:
        return o[0], lse[0]
    return merge_splits(o, lse)


def _read_host(*scalars: torch.Tensor) -> list[int]:
    # One device-to-host copy for all of them: the grid size must be known on the host.
    return torch.stack([t.to(torch.int64) for t in scalars]).tolist()


def run_prefix_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_start: torch.Tensor,
    q_len: torch.Tensor, kv_indices: torch.Tensor, kv_indptr: torch.Tensor, sm_scale: float,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix_attention` with explicit tile sizes and split count (tests and benchmarks)."""
    _check_inputs(q, k_cache, v_cache, q_start, q_len, kv_indices, kv_indptr)
    num_segments = q_len.shape[0]
    assert q_start.shape[0] == num_segments and kv_indptr.shape[0] == num_segments + 1, (
        "q_start, q_len are [G]; kv_indptr is [G + 1]"
    )
    kv_len = kv_indptr[1:] - kv_indptr[:-1]
    num_rows = max_q_len = max_kv_len = 0
    if num_segments:
        num_rows, max_q_len, min_q_len, max_q_end, max_kv_len, min_kv_len, kv_total = _read_host(
            q_len.sum(), q_len.max(), q_len.min(), (q_start.to(torch.int64) + q_len).max(),
            kv_len.max(), kv_len.min(), kv_indptr[-1],
        )
        assert min_q_len >= 0 and max_q_end <= q.shape[0], "q_start + q_len must lie within q"
        assert min_kv_len >= 0 and kv_total <= kv_indices.shape[0], "kv_indptr: non-decreasing, in kv_indices"
    out_start = torch.cumsum(q_len, 0, dtype=q_len.dtype) - q_len  # rows in segment order
    seg = AttentionPlan(q_start, q_len, out_start, kv_indices, kv_indptr, num_rows, max_q_len, max_kv_len,
                        is_covered=True, is_causal=False)
    return _attention(q, k_cache, v_cache, seg, sm_scale, config or LaunchConfig())


def run_own_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_indptr: torch.Tensor,
    kv_indices: torch.Tensor, kv_indptr: torch.Tensor, sm_scale: float, config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`own_attention` with explicit tile sizes and split count (tests and benchmarks)."""
    _check_inputs(q, k_cache, v_cache, q_indptr, kv_indices, kv_indptr)
    assert q_indptr.shape[0] == kv_indptr.shape[0] >= 1, "q_indptr and kv_indptr are both [S + 1]"
    q_len = q_indptr[1:] - q_indptr[:-1]
    kv_len = kv_indptr[1:] - kv_indptr[:-1]
    max_q_len = max_kv_len = 0
    is_covered = True
    if q_len.shape[0]:
        q_first, q_last, max_q_len, min_q_len, max_kv_len, min_kv_len, kv_total = _read_host(
            q_indptr[0], q_indptr[-1], q_len.max(), q_len.min(), kv_len.max(), kv_len.min(), kv_indptr[-1],
        )
        assert q_first >= 0 and min_q_len >= 0 and q_last <= q.shape[0], "q_indptr: non-decreasing, within q"
        assert min_kv_len >= 0 and kv_total <= kv_indices.shape[0], "kv_indptr: non-decreasing, in kv_indices"
        is_covered = q_first == 0 and q_last == q.shape[0]
    q_start = q_indptr[:-1]
    seg = AttentionPlan(q_start, q_len, q_start, kv_indices, kv_indptr, q.shape[0], max_q_len, max_kv_len,
                        is_covered, is_causal=True)
    return _attention(q, k_cache, v_cache, seg, sm_scale, config or LaunchConfig())


def plan_prefix(*, q_start: np.ndarray, q_len: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray,
                device: torch.device) -> AttentionPlan:
    """An `AttentionPlan` for `prefix_attention`'s arguments given as host arrays (maxima read on the host)."""
    q_len = np.asarray(q_len, np.int64)
    kv_len = np.diff(np.asarray(kv_indptr, np.int64))
    out_start = np.cumsum(q_len) - q_len
    return AttentionPlan(
        *_to_device(device, q_start, q_len, out_start, kv_indices, kv_indptr),
        num_out_rows=int(q_len.sum()), max_q_len=int(q_len.max(initial=0)), max_kv_len=int(kv_len.max(initial=0)),
        is_covered=True, is_causal=False,
    )


def plan_own(*, q_indptr: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray,
             device: torch.device) -> AttentionPlan:
    """An `AttentionPlan` for `own_attention`'s arguments given as host arrays; q has q_indptr[-1] rows."""
    q_indptr = np.asarray(q_indptr, np.int64)
    q_len = np.diff(q_indptr)
    kv_len = np.diff(np.asarray(kv_indptr, np.int64))
    q_start = q_indptr[:-1]
    return AttentionPlan(
        *_to_device(device, q_start, q_len, q_start, kv_indices, kv_indptr),
        num_out_rows=int(q_indptr[-1]), max_q_len=int(q_len.max(initial=0)), max_kv_len=int(kv_len.max(initial=0)),
        is_covered=bool(q_indptr[0] == 0), is_causal=True,
    )


def _to_device(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(device, non_blocking=True) for a in arrays]


def prefix_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_start: torch.Tensor,
    q_len: torch.Tensor, kv_indices: torch.Tensor, kv_indptr: torch.Tensor, sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of each segment's query rows to that segment's (shared prefix) KV.

    q: [N, Hq, D]; k_cache, v_cache: [num_slots, Hkv, D] (fp16, bf16 or fp32, one dtype; D in 64, 80, 96,
    128; Hq / Hkv in 1, 2, 4, 8; the last dim contiguous). q_start, q_len: int [G]: segment g's queries are
    q[q_start[g] : q_start[g] + q_len[g]]; its keys are the slots kv_indices[kv_indptr[g] : kv_indptr[g + 1]]
    (kv_indptr: int [G + 1]). Returns o: float32 [sum(q_len), Hq, D] and lse: float32 [sum(q_len), Hq], the
    LSE in natural log, rows in segment order; a segment without keys gives o = 0, lse = -inf.
    Reads the metadata maxima to the host once (one device sync).
    """
    return run_prefix_attention(
        q, k_cache, v_cache, q_start=q_start, q_len=q_len, kv_indices=kv_indices, kv_indptr=kv_indptr,
        sm_scale=sm_scale,
    )


def own_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_indptr: torch.Tensor,
    kv_indices: torch.Tensor, kv_indptr: torch.Tensor, sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's queries to its own KV.

    q: [N, Hq, D]; k_cache, v_cache as in `prefix_attention`. Sequence s owns query rows
    q_indptr[s] : q_indptr[s + 1] and keys kv_indices[kv_indptr[s] : kv_indptr[s + 1]] (q_indptr, kv_indptr:
    int [S + 1]); its query i of q_len sees key j iff j <= kv_len - q_len + i (decode, prefill and chunked
    prefill alike). Returns o: float32 [N, Hq, D] and lse: float32 [N, Hq] in natural log; rows that see no
    key (kv_len 0, or outside every sequence) give o = 0, lse = -inf. One device sync for the maxima.
    """
    return run_own_attention(
        q, k_cache, v_cache, q_indptr=q_indptr, kv_indices=kv_indices, kv_indptr=kv_indptr, sm_scale=sm_scale,
    )
