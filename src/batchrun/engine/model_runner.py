"""The model runner: a step's host batch to the device (one copy), the model forward with cascade attention over
the KV pool, the logits of the sampled rows, and the step's results back to the host (one copy, the step's only
device sync). With the sampler and the KV pool, the only engine code that touches the device.
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


def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 host arrays as device tensors. On CUDA they are packed into one pinned buffer and copied in one
    asynchronous transfer (torch's pinned-memory cache keeps the buffer until the copy has run); on the CPU they
    are the arrays themselves."""
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in arrays]
    sizes = [a.size for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=True)
    np.concatenate(arrays, out=host.numpy())
    return list(host.to(device, non_blocking=True).split(sizes))


def step_results(tokens: torch.Tensor, is_nan: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The sampled tokens (int64 [M]) and which rows' logits held a NaN (bool [M]) to the host in one copy: the
    step's one device-to-host sync."""
    host = torch.stack([tokens, is_nan.to(torch.int64)]).cpu().numpy()
    return host[0], host[1].astype(bool)
