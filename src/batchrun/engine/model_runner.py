"""The model runner: a step's host batch to the device, the model forward with cascade attention over the KV
pool, and the logits of the sampled rows. With the sampler and the KV pool, the only engine code that touches
the device.
"""

from __future__ import annotations

import numpy as np
import torch

from batchrun.attention import AttentionBackend
from batchrun.engine.batch import StepBatch
from batchrun.engine.kv_cache import KVCache
from batchrun.model.llama import LlamaModel


class ModelRunner:
    """Runs `model` over steps, writing each step's k and v into `kv` and attending through `backend`."""

    def __init__(self, model: LlamaModel, backend: AttentionBackend, kv: KVCache) -> None:
        self.model, self.backend, self.kv = model, backend, kv
        self.device = model.device

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Runs the model over the step's rows and returns float32 logits [M, V] of the sampled rows."""
        layout = self.backend.prepare(batch.attention)
        slots = self._to_device(batch.slots)
        backend, kv, sm_scale = self.backend, self.kv, self.model.sm_scale

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q [N, Hq, D], k/v [N, Hkv, D] (post-RoPE) → o [N, Hq, D]
            kv.write(layer, slots, k, v)
            k_cache, v_cache = kv.layer(layer)
            return backend.attend(layout, q, k_cache, v_cache, sm_scale=sm_scale).o

        hidden = self.model.forward(self._to_device(batch.input_ids), self._to_device(batch.positions), attention)
        return self.model.compute_logits(hidden.index_select(0, self._to_device(batch.logit_rows)))

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)


def nan_rows(logits: torch.Tensor) -> np.ndarray:
    """bool [M]: the rows of logits [M, V] that hold a NaN (the request fails rather than sample from them)."""
    return torch.isnan(logits).any(dim=-1).cpu().numpy()
