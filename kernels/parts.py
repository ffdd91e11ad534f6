"""The engine's view of a step's attention: the own part (causal, per sequence) and the prefix parts (one per
shared depth, non-causal, per segment) as host arrays, planned together (`plan_step`); and the contract's
functional API (`prefix_attention`, `own_attention`) over device tensors, planned per call (one device sync)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .configs import LaunchConfig
from .launch import StepPlan, attend, check_inputs, plan_parts
from .worklist import Part


class OwnPart(NamedTuple):
    """Sequence s owns q rows q_indptr[s] : q_indptr[s + 1] and keys kv_indices[kv_indptr[s] : kv_indptr[s + 1]]
    (both indptr [S + 1]); its query i of q_len sees key j iff j <= kv_len - q_len + i."""

    q_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_indptr: np.ndarray


class PrefixPart(NamedTuple):
    """Segment g's q rows q_start[g] : q_start[g] + q_len[g] see every key kv_indices[kv_indptr[g] :
    kv_indptr[g + 1]] (q_start, q_len [G]; kv_indptr [G + 1])."""

    q_start: np.ndarray
    q_len: np.ndarray
    kv_indices: np.ndarray
    kv_indptr: np.ndarray


def own_part(part: OwnPart, out_start: np.ndarray | None = None) -> Part:
    q_indptr = np.asarray(part.q_indptr, np.int64)
    q_start = q_indptr[:-1]
    return Part(q_start, np.diff(q_indptr), q_start if out_start is None else out_start, part.kv_indices,
                part.kv_indptr, is_causal=True)


def prefix_part(part: PrefixPart, out_start: np.ndarray | None = None) -> Part:
    q_start = np.asarray(part.q_start, np.int64)
    return Part(q_start, part.q_len, q_start if out_start is None else out_start, part.kv_indices,
                part.kv_indptr, is_causal=False)


def plan_step(
    *, num_rows: int, own: OwnPart | None, prefixes: Sequence[PrefixPart], num_heads: int, num_kv_heads: int,
    head_dim: int, dtype: torch.dtype, device: torch.device, config: LaunchConfig | None = None,
    capability: int | None = None,
) -> StepPlan:
    """The step's plan, made once on the host (no device sync) and reused by every layer's `attend`: the own
    part and every prefix depth write q's rows [0, num_rows), and `attend` returns them merged. All index
    arrays are host integer arrays; they reach the kernel as int32 (pools up to 2**31 slots). capability (80, 90)
picks the tiles for that GPU generation instead of the device's."""
    parts = ([] if own is None else [own_part(own)]) + [prefix_part(p) for p in prefixes]
    return plan_parts(parts, num_rows=num_rows, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      dtype=dtype, device=device, config=config, capability=capability)


def _host(*tensors: torch.Tensor) -> list[np.ndarray]:
    for t in tensors:
        assert t.dtype in (torch.int32, torch.int64), "index tensors are int32 or int64"
        assert t.dim() == 1, "index tensors are 1-D"
    return [t.cpu().numpy() for t in tensors]


def _run(part: Part, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, num_rows: int,
         sm_scale: float, config: LaunchConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs(q, k_cache, v_cache)
    q_end = np.asarray(part.q_start, np.int64) + np.asarray(part.q_len, np.int64)
    assert (np.asarray(part.q_start) >= 0).all() and (q_end <= q.shape[0]).all(), "segments must lie within q"
    plan = plan_parts([part], num_rows=num_rows, num_heads=q.shape[1], num_kv_heads=k_cache.shape[1],
                      head_dim=q.shape[2], dtype=q.dtype, device=q.device, config=config)
    return attend(plan, q, k_cache, v_cache, sm_scale=sm_scale)


def run_prefix_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_start: torch.Tensor,
    q_len: torch.Tensor, kv_indices: torch.Tensor, kv_indptr: torch.Tensor, sm_scale: float,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix_attention` with explicit tile sizes and split count (tests and benchmarks)."""
    part = PrefixPart(*_host(q_start, q_len, kv_indices, kv_indptr))
    assert len(part.q_start) == len(part.q_len) == len(part.kv_indptr) - 1, "q_start, q_len [G]; kv_indptr [G + 1]"
    q_len_host = np.asarray(part.q_len, np.int64)
    out_start = np.cumsum(q_len_host) - q_len_host  # rows in segment order
    return _run(prefix_part(part, out_start), q, k_cache, v_cache, num_rows=int(q_len_host.sum()), sm_scale=sm_scale,
                config=config)


def run_own_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_indptr: torch.Tensor,
    kv_indices: torch.Tensor, kv_indptr: torch.Tensor, sm_scale: float, config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`own_attention` with explicit tile sizes and split count (tests and benchmarks)."""
    part = OwnPart(*_host(q_indptr, kv_indices, kv_indptr))
    assert len(part.q_indptr) == len(part.kv_indptr) >= 1, "q_indptr and kv_indptr are both [S + 1]"
    return _run(own_part(part), q, k_cache, v_cache, num_rows=q.shape[0], sm_scale=sm_scale, config=config)


def prefix_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_start: torch.Tensor,
    q_len: torch.Tensor, kv_indices: torch.Tensor, kv_indptr: torch.Tensor, sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of each segment's query rows to that segment's (shared prefix) KV.

    q: [N, Hq, D]; k_cache, v_cache: [num_slots, Hkv, D] (fp16, bf16 or fp32, one dtype; D in 64, 80, 96,
    128; any whole GQA ratio Hq / Hkv; the last dim contiguous). q_start, q_len: int [G]: segment g's queries
    are q[q_start[g] : q_start[g] + q_len[g]]; its keys are the slots kv_indices[kv_indptr[g] : kv_indptr[g + 1]]
    (kv_indptr: int [G + 1]). Returns o: float32 [sum(q_len), Hq, D] and lse: float32 [sum(q_len), Hq], the
    LSE in natural log, rows in segment order; a segment without keys gives o = 0, lse = -inf.
    Reads the metadata to the host (one device sync).
    """
    return run_prefix_attention(q, k_cache, v_cache, q_start=q_start, q_len=q_len, kv_indices=kv_indices,
                                kv_indptr=kv_indptr, sm_scale=sm_scale)


def own_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_indptr: torch.Tensor,
    kv_indices: torch.Tensor, kv_indptr: torch.Tensor, sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's queries to its own KV.

    q: [N, Hq, D]; k_cache, v_cache as in `prefix_attention`. Sequence s owns query rows
    q_indptr[s] : q_indptr[s + 1] and keys kv_indices[kv_indptr[s] : kv_indptr[s + 1]] (q_indptr, kv_indptr:
    int [S + 1]); its query i of q_len sees key j iff j <= kv_len - q_len + i (decode, prefill and chunked
    prefill alike). Returns o: float32 [N, Hq, D] and lse: float32 [N, Hq] in natural log; rows that see no
    key (kv_len 0, or outside every sequence) give o = 0, lse = -inf. One device sync for the metadata.
    """
    return run_own_attention(q, k_cache, v_cache, q_indptr=q_indptr, kv_indices=kv_indices, kv_indptr=kv_indptr,
                             sm_scale=sm_scale)
