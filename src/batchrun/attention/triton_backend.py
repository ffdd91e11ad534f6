"""The Triton backend: an adapter over the kernels of `batchrun.kernels`, whose `prepare_step` makes a step's launch
metadata once on the host (on the first layer, when the head counts and dtype are known), so every layer's
`attend` is launches only, with no device sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from batchrun.attention.base import AttentionBackend, AttentionState, CascadeInput

if TYPE_CHECKING:
    from batchrun.kernels import StepWork


class TritonStepLayout:
    """The step's parts; the kernels' work list is made by the first layer's `attend` and reused by the others."""

    def __init__(self, step: CascadeInput) -> None:
        self.step = step
        self.work: StepWork | None = None


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
        if layout.work is None:
            step = layout.step
            layout.work = self.kernels.prepare_step(
                num_rows=step.num_rows, own=step.own, prefixes=step.prefixes, num_heads=q.shape[1],
                num_kv_heads=k_cache.shape[1], head_dim=q.shape[2], dtype=q.dtype, device=self.device,
            )
        return AttentionState(*self.kernels.attend(layout.work, q, k_cache, v_cache, sm_scale=sm_scale))
