"""The cascade attention kernel: one program per (work item, KV head) runs the online softmax of a query tile over
a key chunk of one segment (own part: causal; prefix part: not), then writes its state either straight to the
output or, for rows several items write, to a partial row, and the last of those items merges them (no extra pass)."""

from __future__ import annotations

import triton
import triton.language as tl

from .merge import merge_pair

_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attend_keys(
    acc, m_i, l_i, q, q_limit, k_ptr, v_ptr, kv_indices_ptr, kv_lo, kv_hi, kv_head,
    stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax in base 2 of the tile q: [BLOCK_M, BLOCK_D] over keys kv_lo <= j < kv_hi of one segment
    (pool slots kv_indices_ptr[j]); row r sees key j only if j <= q_limit[r].
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
        s = tl.where(j_mask[None, :] & (j[None, :] <= q_limit[:, None]), s, float("-inf"))
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
def _merge_partials(
    o_ptr, lse_ptr, part_o_ptr, part_lse_ptr, counter_ptr, part_indptr_ptr, part_rows_ptr,
    out_row, head, num_parts, is_last, offs_d, d_mask, num_heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Folds the partial states of the rows is_last marks into the output and re-arms their counters."""
    o = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    first = tl.load(part_indptr_ptr + out_row, mask=is_last, other=0)
    for k in range(0, tl.max(tl.where(is_last, num_parts, 0), 0)):
        has_part = is_last & (k < num_parts)
        prow = tl.load(part_rows_ptr + first + k, mask=has_part, other=0).to(tl.int64)
        # .cg reads L2, where the other programs' stores are: this SM's L1 may hold stale lines of them.
        o_p = tl.load(part_o_ptr + (prow * num_heads + head)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=has_part[:, None] & d_mask[None, :], other=0.0, cache_modifier=".cg")
        s_p = tl.load(part_lse_ptr + prow * num_heads + head, mask=has_part, other=float("-inf"),
                      cache_modifier=".cg")
        o, s = merge_pair(o, s, o_p, s_p)
    out = out_row.to(tl.int64) * num_heads + head
    tl.store(o_ptr + out[:, None] * HEAD_DIM + offs_d[None, :], o, mask=is_last[:, None] & d_mask[None, :])
    tl.store(lse_ptr + out, s, mask=is_last)
    tl.store(counter_ptr + out, tl.zeros_like(num_parts), mask=is_last)


@triton.jit
def cascade_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr, counter_ptr,
    kv_indices_ptr, seg_ptr, item_ptr, num_parts_ptr, part_indptr_ptr, part_rows_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (items, KV heads). Tile row r is token r // GROUP of the item with query head kv_head * GROUP +
    r % GROUP: the GQA group's heads are stacked so one KV read serves them all. o, lse, part_o, part_lse and
    counter_ptr are contiguous: [rows, Hq, HEAD_DIM] and [rows, Hq]; the tables are worklist's."""
    item = item_ptr + tl.program_id(0) * 8
    kv_head = tl.program_id(1)
    num_heads = GROUP * tl.num_programs(1)
    seg = seg_ptr + tl.load(item) * 8
    tok0, num_tok = tl.load(item + 1), tl.load(item + 2)
    kv_lo, kv_hi, part0 = tl.load(item + 3), tl.load(item + 4), tl.load(item + 5)
    q_start, out_start, kv_start, diag = tl.load(seg), tl.load(seg + 1), tl.load(seg + 2), tl.load(seg + 3)

    offs_m = tl.arange(0, BLOCK_M)
    t = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = t < num_tok
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_row = (q_start + tok0 + t).to(tl.int64)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, diag + tok0 + t, k_ptr, v_ptr, kv_indices_ptr + kv_start, kv_lo, kv_hi, kv_head,
        stride_kn, stride_kh, stride_vn, stride_vh, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST,
    )
    # No visible key leaves l_i = 0: the empty state o = 0, lse = -inf.
    is_empty = l_i == 0.0
    l_safe = tl.where(is_empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(is_empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)  # base 2 -> natural log

    out_row = out_start + tok0 + t
    num_parts = tl.load(num_parts_ptr + out_row, mask=row_mask, other=1)
    is_sole = row_mask & (num_parts == 1)
    out = out_row.to(tl.int64) * num_heads + head
    tl.store(o_ptr + out[:, None] * HEAD_DIM + offs_d[None, :], o, mask=is_sole[:, None] & d_mask[None, :])
    tl.store(lse_ptr + out, lse, mask=is_sole)
    if part0 >= 0:  # some rows are written by other items too: leave a partial state, merge if last
        is_shared = row_mask & (num_parts > 1)
        prow = (part0 + t).to(tl.int64) * num_heads + head
        tl.store(part_o_ptr + prow[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=is_shared[:, None] & d_mask[None, :])
        tl.store(part_lse_ptr + prow, lse, mask=is_shared)
        # The barrier orders every thread's partial stores before the release of the counter increment.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + out, 1, mask=is_shared, sem="acq_rel", scope="gpu")
        is_last = is_shared & (arrived == num_parts - 1)
        tl.debug_barrier()
        if tl.max(is_last.to(tl.int32), 0) > 0:
            _merge_partials(
                o_ptr, lse_ptr, part_o_ptr, part_lse_ptr, counter_ptr, part_indptr_ptr, part_rows_ptr,
                out_row, head, num_parts, is_last, offs_d, d_mask, num_heads, HEAD_DIM, BLOCK_M, BLOCK_D,
            )
