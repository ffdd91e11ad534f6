"""The Triton backend: an adapter over `batchrun.kernels`, which plans a whole step once (`plan_step`: the own
part and every prefix depth in one work list, copied to the device in one transfer) and runs it per layer
(`attend`: at most two launches, the parts merged in the kernel, no device sync).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from batchrun.attention.base import AttentionBackend, AttentionState, CascadeInput

if TYPE_CHECKING:
    from batchrun.kernels import StepPlan


@dataclass(frozen=True)
class TritonStepLayout:
    """A step's parts (host arrays) and their kernel plans. The step carries the GQA ratio but not the head
    count, head size or dtype the tiles are chosen for, so the plan is made by the first layer's `attend` and
    reused by the others (every layer of a model shares them)."""

    step: CascadeInput
    plans: dict[tuple[int, int, int, torch.dtype], StepPlan] = field(default_factory=dict)


class TritonBackend(AttentionBackend[TritonStepLayout]):
    """Raises ImportError where triton does not import."""

    name = "triton"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        import batchrun.kernels as kernels  # here, not at the top: importing triton is slow, and fails without it

        self.kernels = kernels

    def prepare(self, step: CascadeInput) -> TritonStepLayout:
        return TritonStepLayout(step)

    def attend(
        self, layout: TritonStepLayout, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
        sm_scale: float,
    ) -> AttentionState:
        return AttentionState(*self.kernels.attend(self._plan(layout, q, k_cache), q, k_cache, v_cache,
                                                   sm_scale=sm_scale))

    def _plan(self, layout: TritonStepLayout, q: torch.Tensor, k_cache: torch.Tensor) -> StepPlan:
        num_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[1], q.shape[2]
        key = (num_heads, num_kv_heads, head_dim, q.dtype)
        plan = layout.plans.get(key)
        if plan is None:
            step = layout.step
            assert num_heads == num_kv_heads * step.gqa_ratio, "q and the pool do not have the step's GQA ratio"
            plan = self.kernels.plan_step(
                num_rows=step.num_rows, own=step.own, prefixes=step.prefixes, num_heads=num_heads,
                num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=q.dtype, device=self.device,
            )
            layout.plans[key] = plan
        return plan
