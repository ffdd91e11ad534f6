"""The model runner: a step's host batch to the device, the model forward with cascade attention over the KV
pool, and the logits of the sampled rows. With the sampler and the KV pool, the only engine code that touches
the device.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from batchrun.attention import AttentionBackend
from batchrun.engine.batch import StepBatch
from batchrun.engine.kv_cache import KVCache
from batchrun.model.llama import LlamaModel


class StepAttention(NamedTuple):
    """A step's attention metadata, laid out once by the backend and reused by every layer."""

    own: object  # the backend's layout of the own part
    prefix: list[tuple[object, torch.Tensor | slice]]  # per depth: a prefix part's layout, the rows it merges into


class ModelRunner:
    """Runs `model` over steps, writing each step's k and v into `kv` and attending through `backend`."""

    def __init__(self, model: LlamaModel, backend: AttentionBackend, kv: KVCache) -> None:
        self.model, self.backend, self.kv = model, backend, kv
        self.device = model.device
        self.gqa_ratio = model.config.num_heads // model.config.num_kv_heads

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Runs the model over the step's rows and returns float32 logits [M, V] of the sampled rows."""
        step_attention = self._prepare(batch)
        slots = self._to_device(batch.slots)
        backend, kv, sm_scale = self.backend, self.kv, self.model.sm_scale

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q [N, Hq, D], k/v [N, Hkv, D] (post-RoPE) → o [N, Hq, D]
            kv.write(layer, slots, k, v)
            k_cache, v_cache = kv.layer(layer)
            o, lse = backend.own(step_attention.own, q, k_cache, v_cache, sm_scale=sm_scale)
            for layout, rows in step_attention.prefix:
                o_p, lse_p = backend.prefix(layout, q, k_cache, v_cache, sm_scale=sm_scale)
                backend.merge_into(o, lse, o_p, lse_p, rows=rows)
            return o

        hidden = self.model.forward(self._to_device(batch.input_ids), self._to_device(batch.positions), attention)
        return self.model.compute_logits(hidden.index_select(0, self._to_device(batch.logit_rows)))

    def _prepare(self, batch: StepBatch) -> StepAttention:
        backend, gqa_ratio = self.backend, self.gqa_ratio
        own = backend.prepare_own(
            q_indptr=batch.q_indptr, kv_indices=batch.kv_indices, kv_indptr=batch.kv_indptr, gqa_ratio=gqa_ratio
        )
        prefix = [
            (
                backend.prepare_prefix(
                    q_start=p.q_start, q_len=p.q_len, kv_indices=p.kv_indices, kv_indptr=p.kv_indptr,
                    gqa_ratio=gqa_ratio,
                ),
                p.rows if isinstance(p.rows, slice) else self._to_device(p.rows),
            )
            for p in batch.prefix
        ]
        return StepAttention(own, prefix)

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)


def nan_rows(logits: torch.Tensor) -> np.ndarray:
    """bool [M]: the rows of logits [M, V] that hold a NaN (the request fails rather than sample from them)."""
    return torch.isnan(logits).any(dim=-1).cpu().numpy()
