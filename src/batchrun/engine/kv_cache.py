"""The KV slot pool: per layer k/v [num_slots, Hkv, D] sized from the KV budget, and its slot allocator.

Page size 1: a token's KV lives in one slot anywhere in the pool, so the pool never fragments and an
admission that fits the budget always gets its slots. The allocator is pure bookkeeping (numpy, no torch).
"""

from __future__ import annotations

import numpy as np
import torch


class SlotAllocator:
    """A stack of free slot ids. `alloc` and `free` are vectorised; double frees and leaks are assertions."""

    def __init__(self, num_slots: int) -> None:
        assert num_slots >= 0
        self.num_slots = num_slots
        # Reversed so that a fresh pool hands out 0, 1, 2, ...: neighbouring tokens in neighbouring slots.
        self._free = np.arange(num_slots - 1, -1, -1, dtype=np.int64)
        self._num_free = num_slots
        self._is_free = np.ones(num_slots, dtype=bool)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_slots - self._num_free

    def alloc(self, n: int) -> np.ndarray:
        """n slot ids (int64 [n]); the caller's accounting guarantees they exist."""
        assert 0 <= n <= self._num_free, f"asked for {n} slots, {self._num_free} free"
        top = self._num_free
        slots = self._free[top - n : top][::-1].copy()
        self._num_free = top - n
        assert self._is_free[slots].all()
        self._is_free[slots] = False
        return slots

    def free(self, slots: np.ndarray) -> None:
        n = len(slots)
        assert not self._is_free[slots].any() and len(np.unique(slots)) == n, "slot freed twice"
        self._is_free[slots] = True
        self._free[self._num_free : self._num_free + n] = slots[::-1]
        self._num_free += n


class KVCache:
    """K and V for every layer in two tensors [num_layers, num_slots, Hkv, D]; `allocator` hands out slots."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = SlotAllocator(num_slots)
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * self.k.element_size()

    @property
    def num_slots(self) -> int:
        return self.allocator.num_slots

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each [num_slots, Hkv, D] (views)."""
        return self.k[i], self.v[i]

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores this step's k, v [N, Hkv, D] of layer i into `slots` (int64 [N])."""
        self.k[i].index_copy_(0, slots, k)
        self.v[i].index_copy_(0, slots, v)
