"""The Triton backend: an adapter over the kernels of `batchrun.kernels`, whose `plan_prefix`/`plan_own` make
each step's launch metadata once on the host, so the layers' launches need no device sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from batchrun.attention.base import AttentionBackend, AttentionState

if TYPE_CHECKING:
    from batchrun.kernels import AttentionPlan  # the kernels' name for a launch's metadata


class TritonBackend(AttentionBackend["AttentionPlan"]):
    """Raises ImportError where triton does not import. The kernels read the GQA ratio from the tensors'
    shapes, so `gqa_ratio` is not passed on."""

    name = "triton"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        import batchrun.kernels as kernels  # here, not at the top: importing triton is slow, and fails without it

        self.kernels = kernels

    def prepare_prefix(
        self, *, q_start: np.ndarray, q_len: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, gqa_ratio: int
    ) -> AttentionPlan:
        return self.kernels.plan_prefix(q_start=q_start, q_len=q_len, kv_indices=kv_indices, kv_indptr=kv_indptr,
                                        device=self.device)

    def prepare_own(
        self, *, q_indptr: np.ndarray, kv_indices: np.ndarray, kv_indptr: np.ndarray, gqa_ratio: int
    ) -> AttentionPlan:
        return self.kernels.plan_own(q_indptr=q_indptr, kv_indices=kv_indices, kv_indptr=kv_indptr,
                                     device=self.device)

    def prefix(
        self, layout: AttentionPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
        sm_scale: float,
    ) -> AttentionState:
        return AttentionState(*self.kernels.run_planned(layout, q, k_cache, v_cache, sm_scale=sm_scale))

    def own(
        self, layout: AttentionPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
        sm_scale: float,
    ) -> AttentionState:
        return AttentionState(*self.kernels.run_planned(layout, q, k_cache, v_cache, sm_scale=sm_scale))

    def merge_into(
        self, o: torch.Tensor, lse: torch.Tensor, o_other: torch.Tensor, lse_other: torch.Tensor, *,
        rows: torch.Tensor | slice,
    ) -> None:
        if isinstance(rows, slice):
            rows = torch.arange(o.shape[0], device=o.device)[rows]
        self.kernels.merge_state_into(o, lse, o_other, lse_other, rows=rows)
