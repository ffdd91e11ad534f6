"""Merging attention states (o, lse) with the LSE in natural log, inside the cascade kernel (`merge_pair` folds
the partial states of a row's items). An empty state is o = 0, lse = -inf; merging two empty states gives
0 / -inf, never NaN."""

from __future__ import annotations

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
