"""The CPU backend: per layer, one call of the C++ op (batchrun.cpu_ext) per cascade part, over the KV pool in its own
dtype with fp32 accumulation; each prefix depth resumes the online softmax from the (o, lse) the earlier parts
left, so there is no separate merge. Steps the op cannot run (other head sizes, float64) go to the torch backend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from batchrun.attention.base import AttentionBackend, AttentionState, CascadeInput
from batchrun.attention.torch_backend import TorchBackend, TorchStepLayout
from batchrun.cpu_ext import load_op

HEAD_DIMS = (16, 32, 64, 80, 96, 128)  # the op's compiled head sizes
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GQA_RATIO = 64  # a tile holds up to 64 (query, head) rows of one KV head


class CpuPart(NamedTuple):
    """One part's metadata as int64 CPU tensors (views of the host arrays, no copies)."""

    q_start: torch.Tensor
    q_len: torch.Tensor
    kv_indices: torch.Tensor
    kv_indptr: torch.Tensor
    is_causal: bool


class CpuStepLayout(NamedTuple):
    step: CascadeInput
    parts: tuple[CpuPart, ...]  # the own part first: it writes every row it owns, the prefix depths resume them
    is_covered: bool  # the own part owns every row (else the others start from o = 0, lse = -inf)


class CpuBackend(AttentionBackend[CpuStepLayout]):
    """Raises cpu_ext.OpUnavailable where the op cannot be built or run (select_backend then takes the torch one)."""

    name = "cpu"

    def __init__(self, device: torch.device) -> None:
        assert device.type == "cpu", device
        super().__init__(device)
        self.op = load_op()
        self.fallback = TorchBackend(device)
        self._fallback_layout: tuple[CpuStepLayout, TorchStepLayout] | None = None

    def prepare(self, step: CascadeInput) -> CpuStepLayout:
        own = step.own
        q_indptr = _int64(own.q_indptr)
        own_part = CpuPart(_tensor(q_indptr[:-1]), _tensor(np.diff(q_indptr)), _tensor(own.kv_indices),
                           _tensor(own.kv_indptr), is_causal=True)
        prefixes = tuple(
            CpuPart(_tensor(p.q_start), _tensor(p.q_len), _tensor(p.kv_indices), _tensor(p.kv_indptr), is_causal=False)
            for p in step.prefixes
        )
        is_covered = len(q_indptr) > 1 and q_indptr[0] == 0 and q_indptr[-1] == step.num_rows
        return CpuStepLayout(step, (own_part, *prefixes), is_covered)

    def attend(
        self, layout: CpuStepLayout, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
        sm_scale: float,
    ) -> AttentionState:
        if not self.is_supported(q, k_cache):
            return self.fallback.attend(self._torch_layout(layout), q, k_cache, v_cache, sm_scale=sm_scale)
        num_rows, num_heads, head_dim = q.shape
        if layout.is_covered:
            o = torch.empty(num_rows, num_heads, head_dim, dtype=torch.float32)
            lse = torch.empty(num_rows, num_heads, dtype=torch.float32)
        else:
            o = torch.zeros(num_rows, num_heads, head_dim, dtype=torch.float32)
            lse = torch.full((num_rows, num_heads), -math.inf, dtype=torch.float32)
        for i, part in enumerate(layout.parts):
            self.op.attention_part_(q, k_cache, v_cache, o, lse, part.q_start, part.q_len, part.kv_indices,
                                    part.kv_indptr, part.is_causal, i > 0, sm_scale)
        return AttentionState(o, lse)

    @staticmethod
    def is_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether the op runs these shapes and dtype (else the torch backend does)."""
        return (q.dtype in DTYPES and q.dtype == k_cache.dtype and q.shape[2] in HEAD_DIMS
                and q.shape[1] // k_cache.shape[1] <= MAX_GQA_RATIO)

    def _torch_layout(self, layout: CpuStepLayout) -> TorchStepLayout:
        """The torch backend's layout of the step, made on its first layer and kept for the others."""
        if self._fallback_layout is None or self._fallback_layout[0] is not layout:
            self._fallback_layout = (layout, self.fallback.prepare(layout.step))
        return self._fallback_layout[1]


def _int64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(_int64(a))
