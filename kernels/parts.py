"""The engine's view of a step's attention: the own part (causal, per sequence) and the prefix parts (one per
shared depth, non-causal, per segment) as host arrays, prepared together once per step (`prepare_step`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .configs import LaunchConfig
from .launch import StepWork, prepare_parts
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


def own_part(part: OwnPart) -> Part:
    """Output rows are q rows."""
    q_indptr = np.asarray(part.q_indptr, np.int64)
    return Part(q_indptr[:-1], np.diff(q_indptr), q_indptr[:-1], part.kv_indices, part.kv_indptr, is_causal=True)


def prefix_part(part: PrefixPart) -> Part:
    """Output rows are q rows: the merge with the own part and the other depths happens in the kernel."""
    q_start = np.asarray(part.q_start, np.int64)
    return Part(q_start, part.q_len, q_start, part.kv_indices, part.kv_indptr, is_causal=False)


def prepare_step(
    *, num_rows: int, own: OwnPart | None, prefixes: Sequence[PrefixPart], num_heads: int, num_kv_heads: int,
    head_dim: int, dtype: torch.dtype, device: torch.device, config: LaunchConfig | None = None,
    capability: int | None = None,
) -> StepWork:
    """The step's work list, made once on the host (no device sync) and reused by every layer's `attend`: the own
    part and every prefix depth write q's rows [0, num_rows), and `attend` returns them merged. All index
    arrays are host integer arrays; they reach the kernel as int32 (pools up to 2**31 slots). capability (80,
    90) picks the tiles for that GPU generation instead of the device's."""
    parts = ([] if own is None else [own_part(own)]) + [prefix_part(p) for p in prefixes]
    return prepare_parts(parts, num_rows=num_rows, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      dtype=dtype, device=device, config=config, capability=capability)
