"""The step's copies between host and device: its host arrays go over in one pinned, asynchronous copy
(`upload`); its results come back in one copy (`step_results`), the step's only device sync. On the CPU
both are free: tensors share the numpy arrays' memory.
"""

from __future__ import annotations

import numpy as np
import torch


def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """1-D host arrays of one dtype as device tensors. On CUDA: packed into one pinned buffer and copied with
    non_blocking (torch's pinned-memory cache keeps the buffer until the copy has run), so the host goes on
    without waiting for the device; elsewhere the arrays themselves."""
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    if device.type != "cuda":
        return tensors
    packed = torch.cat(tensors).pin_memory()
    return list(packed.to(device, non_blocking=True).split([t.numel() for t in tensors]))


def step_results(tokens: torch.Tensor, is_nan: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The sampled tokens (int64 [M]) and which rows' logits held a NaN (bool [M]) to the host in one copy."""
    host = torch.stack([tokens, is_nan.to(torch.int64)]).cpu().numpy()
    return host[0], host[1].astype(bool)
