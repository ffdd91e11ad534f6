"""Merging attention states (o, lse) with the LSE in natural log: two states into one (`merge_state`), one
state into selected rows of another in place (`merge_state_into`); `merge_pair` also folds the cascade kernel's
partial states. An empty state is o = 0, lse = -inf; merging two empty states gives 0 / -inf, never NaN."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def merge_pair(o_a, s_a, o_b, s_b):
    """Log-sum-exp merge of o_*: [BLOCK_H, BLOCK_D] with natural-log LSEs s_*: [BLOCK_H]; returns (o, s)."""
    m = tl.maximum(s_a, s_b)
    # Two empty states have m = -inf; subtracting it would give exp(-inf + inf) = NaN.
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(s_a - m_safe)
    w_b = tl.exp(s_b - m_safe)
    w = w_a + w_b
    is_empty = w == 0.0
    o = (o_a * w_a[:, None] + o_b * w_b[:, None]) / tl.where(is_empty, 1.0, w)[:, None]
    s = tl.where(is_empty, float("-inf"), m_safe + tl.log(tl.where(is_empty, 1.0, w)))
    return o, s


@triton.jit
def _merge_state_kernel(
    o_ptr, lse_ptr, a_ptr, sa_ptr, b_ptr, sb_ptr, rows_ptr,
    num_heads, head_dim,
    HAS_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per row of b: merges b[i] with a[r] into o[r], r = rows[i] if HAS_ROWS else i."""
    i = tl.program_id(0).to(tl.int64)
    r = i
    if HAS_ROWS:
        r = tl.load(rows_ptr + i).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < num_heads
    mask = h_mask[:, None] & (offs_d[None, :] < head_dim)
    tile = offs_h[:, None] * head_dim + offs_d[None, :]
    row_len = num_heads * head_dim
    o_a = tl.load(a_ptr + r * row_len + tile, mask=mask, other=0.0)
    o_b = tl.load(b_ptr + i * row_len + tile, mask=mask, other=0.0)
    s_a = tl.load(sa_ptr + r * num_heads + offs_h, mask=h_mask, other=float("-inf"))
    s_b = tl.load(sb_ptr + i * num_heads + offs_h, mask=h_mask, other=float("-inf"))
    o, s = merge_pair(o_a, s_a, o_b, s_b)
    # In place (o is a) is safe: this program alone reads and writes row r, as the rows are unique.
    tl.store(o_ptr + r * row_len + tile, o, mask=mask)
    tl.store(lse_ptr + r * num_heads + offs_h, s, mask=h_mask)


def _check_state(v: torch.Tensor, s: torch.Tensor, name: str) -> None:
    assert v.dtype == torch.float32 and s.dtype == torch.float32, f"{name}: states are float32"
    assert v.dim() == 3 and s.shape == v.shape[:2], f"{name}: v [N, H, D] with s [N, H]"
    assert v.is_contiguous() and s.is_contiguous(), f"{name}: states must be contiguous"


def _launch_merge(o, lse, a, s_a, b, s_b, rows: torch.Tensor | None) -> None:
    num_heads, head_dim = b.shape[1], b.shape[2]
    if b.shape[0] == 0:
        return
    _merge_state_kernel[(b.shape[0],)](
        o, lse, a, s_a, b, s_b, rows if rows is not None else b,
        num_heads, head_dim,
        HAS_ROWS=rows is not None,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def merge_state(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states over disjoint key sets.

    v_a, v_b: float32 [N, H, D]; s_a, s_b: float32 [N, H], natural-log LSE. Returns new (v [N, H, D],
    s [N, H]); rows where both parts are empty come out as 0 / -inf.
    """
    _check_state(v_a, s_a, "v_a")
    _check_state(v_b, s_b, "v_b")
    assert v_a.shape == v_b.shape and v_a.device == v_b.device, "merge_state: shapes or devices differ"
    v, s = torch.empty_like(v_a), torch.empty_like(s_a)
    _launch_merge(v, s, v_a, s_a, v_b, s_b, rows=None)
    return v, s


def merge_state_into(
    v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor, *, rows: torch.Tensor
) -> None:
    """Merge v_other[i] into v[rows[i]] in place (and s likewise).

    v: float32 [M, H, D], s: float32 [M, H] (natural-log LSE), updated in place; v_other: [K, H, D],
    s_other: [K, H]; rows: int32 or int64 [K], unique (duplicates would race), each in [0, M).
    """
    _check_state(v, s, "v")
    _check_state(v_other, s_other, "v_other")
    assert v.shape[1:] == v_other.shape[1:], "merge_state_into: head count or head size differ"
    assert rows.dim() == 1 and rows.shape[0] == v_other.shape[0], "merge_state_into: rows must be [K]"
    assert rows.dtype in (torch.int32, torch.int64) and rows.is_contiguous(), "rows: contiguous int32/int64"
    assert v.device == v_other.device == rows.device, "merge_state_into: tensors on different devices"
    _launch_merge(v, s, v, s, v_other, s_other, rows=rows)
