"""The per-part API the engine's current Triton adapter calls: `plan_prefix` / `plan_own` once per step,
`run_planned` per layer, `merge_state_into` after. Each part is planned alone on the step work list; its
StepPlan is made at the first layer, when the heads, head size and dtype are known, and reused by the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .launch import StepPlan, attend, plan_parts
from .parts import OwnPart, PrefixPart, own_part, prefix_part
from .worklist import Part


@dataclass(frozen=True)
class PartPlan:
    """One part's host metadata; num_rows None: the rows of q (own part)."""

    part: Part
    num_rows: int | None
    device: torch.device
    plans: dict[tuple, StepPlan] = field(default_factory=dict)  # by (rows, heads, KV heads, head size, dtype)

    def step_plan(self, q: torch.Tensor, k_cache: torch.Tensor) -> StepPlan:
        num_rows = q.shape[0] if self.num_rows is None else self.num_rows
        key = (num_rows, q.shape[1], k_cache.shape[1], q.shape[2], q.dtype)
        if key not in self.plans:
            self.plans[key] = plan_parts([self.part], num_rows=num_rows, num_heads=q.shape[1],
                                         num_kv_heads=k_cache.shape[1], head_dim=q.shape[2], dtype=q.dtype,
                                         device=self.device)
        return self.plans[key]


def plan_prefix(*, q_start: np.ndarray, q_len: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray,
                device: torch.device) -> PartPlan:
    """`prefix_attention`'s part as host arrays: its output rows in segment order."""
    q_len = np.asarray(q_len, np.int64)
    part = prefix_part(PrefixPart(q_start, q_len, kv_indices, kv_indptr), out_start=np.cumsum(q_len) - q_len)
    return PartPlan(part, int(q_len.sum()), torch.device(device))


def plan_own(*, q_indptr: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray,
             device: torch.device) -> PartPlan:
    """`own_attention`'s part as host arrays: its output rows are q's."""
    return PartPlan(own_part(OwnPart(q_indptr, kv_indices, kv_indptr)), None, torch.device(device))


def run_planned(plan: PartPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The part's (o, lse) as `prefix_attention` / `own_attention` return them; no device sync."""
    return attend(plan.step_plan(q, k_cache), q, k_cache, v_cache, sm_scale=sm_scale)
