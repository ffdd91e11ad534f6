"""The model runner: a step's host batch to the device (one copy), the model forward with cascade attention over
the KV pool, and the logits of the sampled rows. With the sampler and the KV pool, the only engine code that
touches the device.
"""

from __future__ import annotations

import torch

from batchrun.attention import AttentionBackend
from batchrun.engine.batch import StepBatch
from batchrun.engine.kv_cache import KVCache
from batchrun.engine.transfer import upload
from batchrun.model.llama import LlamaModel


class ModelRunner:
    """Runs `model` over steps, writing each step's k and v into `kv` and attending through `backend`."""

    def __init__(self, model: LlamaModel, backend: AttentionBackend, kv: KVCache) -> None:
        self.model, self.backend, self.kv = model, backend, kv
        self.device = model.device

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Runs the model over the step's rows and returns float32 logits [M, V] of the sampled rows."""
        layout = self.backend.prepare(batch.attention)
        input_ids, positions, slots, logit_rows = upload(
            [batch.input_ids, batch.positions, batch.slots, batch.logit_rows], self.device
        )
        backend, kv, sm_scale = self.backend, self.kv, self.model.sm_scale

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q [N, Hq, D], k/v [N, Hkv, D] (post-RoPE) → o [N, Hq, D]
            kv.write(layer, slots, k, v)
            k_cache, v_cache = kv.layer(layer)
            return backend.attend(layout, q, k_cache, v_cache, sm_scale=sm_scale).o

        hidden = self.model.forward(input_ids, positions, attention)
        return self.model.compute_logits(hidden.index_select(0, logit_rows))

