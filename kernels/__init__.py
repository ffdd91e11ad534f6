"""Triton cascade attention kernels (installed as batchrun.kernels). The engine plans a step once on the host
(`plan_step`: the own part and every prefix depth in one work list) and calls `attend` per layer: one fused
launch per tile class, the parts merged in the kernel. States are float32 (o, lse), the LSE in natural log.
`plan_prefix` / `plan_own` / `run_planned` (compat.py) serve the current engine adapter, one part at a time."""

from __future__ import annotations

from .compat import plan_own, plan_prefix, run_planned
from .configs import LaunchConfig
from .launch import StepPlan, attend
from .merge import merge_state, merge_state_into
from .parts import OwnPart, PrefixPart, own_attention, plan_step, prefix_attention

__all__ = [
    "LaunchConfig", "OwnPart", "PrefixPart", "StepPlan", "attend", "merge_state", "merge_state_into",
    "own_attention", "plan_own", "plan_prefix", "plan_step", "prefix_attention", "run_planned",
]
