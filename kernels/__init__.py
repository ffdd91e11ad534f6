"""Triton cascade attention kernels (installed as batchrun.kernels). The engine prepares a step once on the host
(`prepare_step`: the own part and every prefix depth in one work list) and calls `attend` per layer: one fused
launch per tile class, the parts merged in the kernel. States are float32 (o, lse), the LSE in natural log."""

from __future__ import annotations

from .configs import LaunchConfig
from .launch import StepWork, attend
from .parts import OwnPart, PrefixPart, prepare_step

__all__ = ["LaunchConfig", "OwnPart", "PrefixPart", "StepWork", "attend", "prepare_step"]
