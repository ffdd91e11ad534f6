"""Cascade attention: the prefix parts, the own part and the LSE merge, over a KV slot pool.

`base` holds the interface (the step's `CascadeInput`, `prepare` and `attend`), the attention state and its
merge; `cpu_backend` (the C++ op of `batchrun.cpu_ext`), `torch_backend` (with `torch_buckets`) and `triton_backend`
implement it; `select_backend` picks one for a device.
"""

from __future__ import annotations

import logging

import torch

from batchrun.attention.base import (
    AttentionBackend,
    AttentionState,
    CascadeInput,
    OwnPart,
    PrefixPart,
    merge_state,
    merge_state_into,
)
from batchrun.attention.cpu_backend import CpuBackend
from batchrun.attention.torch_backend import TorchBackend
from batchrun.attention.triton_backend import TritonBackend
from batchrun.cpu_ext import OpUnavailable

__all__ = [
    "AttentionBackend", "AttentionState", "CascadeInput", "CpuBackend", "OwnPart", "PrefixPart", "TorchBackend",
    "TritonBackend", "merge_state", "merge_state_into", "select_backend",
]


def select_backend(device: torch.device) -> AttentionBackend:
    """On CPU the C++ op (CpuBackend) when it builds and this CPU has AVX-512, else torch with a one-line note;
    on CUDA the Triton kernels (batchrun.kernels) when they import, else torch."""
    if device.type == "cuda":
        try:
            return TritonBackend(device)
        except ImportError:  # no triton for this platform: the torch path runs on CUDA too
            return TorchBackend(device)
    try:
        return CpuBackend(device)
    except OpUnavailable as e:
        logging.getLogger("batchrun").warning("batchrun: CPU attention through torch (%s)", e)
        return TorchBackend(device)
