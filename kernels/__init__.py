"""Triton cascade attention kernels (installed as batchrun.kernels): prefix part, own part and state merge.
States are float32 (o, lse) with the LSE in natural log; same API as batchrun.attention's torch backend.
`plan_prefix` / `plan_own` build a launch's metadata once (on the host, no device sync) for `run_planned`."""

from __future__ import annotations

from .cascade import AttentionPlan, own_attention, plan_own, plan_prefix, prefix_attention, run_planned
from .merge import merge_state, merge_state_into

__all__ = [
    "AttentionPlan", "merge_state", "merge_state_into", "own_attention", "plan_own", "plan_prefix",
    "prefix_attention", "run_planned",
]
