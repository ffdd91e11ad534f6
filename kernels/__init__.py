"""Triton cascade attention kernels (installed as batchrun.kernels): prefix part, own part and state merge.
States are float32 (o, lse) with the LSE in natural log; same API as batchrun.attention's torch backend."""

from __future__ import annotations

from .cascade import own_attention, prefix_attention
from .merge import merge_state, merge_state_into

__all__ = ["merge_state", "merge_state_into", "own_attention", "prefix_attention"]
