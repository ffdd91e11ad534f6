"""The elementwise work of a decoder layer (residual add + RMSNorm, RoPE, silu-and-mul), in two implementations
with one contract: torch's ops (any device and dtype), and the fused C++ ops of `batchrun.cpu_ext` (CPU with
AVX-512; one pass each in fp32, bf16 or fp16, fp32 arithmetic, one rounding per output).
`layer_ops_for` picks one for a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchrun.cpu_ext import OpUnavailable, load_op


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] -> [N, H]: torch's fused kernel, which normalises in float32 in every dtype. In bf16/fp16 it
    rounds once where transformers' LlamaRMSNorm rounds twice (before and after the weight): half the time, one
    unit in the last place apart (the bf16 agreement test bounds the effect on tokens)."""
    return F.rms_norm(x, weight.shape, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D], cos/sin [N, 1, D] (sin signed by `llama.rope_tables`) -> [N, heads, D].

    Equals transformers' `x * cos + rotate_half(x) * sin`: rolling by D/2 gives (x2, x1) and the signed table
    supplies rotate_half's minus, with the same roundings.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class TorchLayerOps:
    """torch's ops, kept op-for-op close to transformers."""

    name = "torch"

    @staticmethod
    def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """hidden [N, H] += delta in place (when given); returns rms_norm(hidden) * weight, a new [N, H]."""
        if delta is not None:
            hidden.add_(delta)
        return rms_norm(hidden, weight, eps)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, heads, D], cos/sin [N, D] (sin signed by `llama.rope_tables`) -> [N, heads, D]."""
        return apply_rope(x, cos.unsqueeze(1), sin.unsqueeze(1))

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [N, 2I] (gate | up) -> silu(gate) * up [N, I], computed in gate_up's buffer."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate, inplace=True).mul_(up)


class CpuLayerOps:
    """The fused C++ ops: the same contract, each one pass over memory. They round as torch's kernels (products
    and sums in fp32, no fused multiply-add where torch has none) except for summation order and the exponential
    (within 2 ulp of float32): fp32 results agree to a few units in the last place, 16-bit ones to one rounding."""

    name = "cpu"

    def __init__(self) -> None:
        self.op = load_op()

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        return self.op.add_rms_norm_(hidden, delta, weight, eps)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates x in place (x is a view of the step's fresh q/k projection) and returns it."""
        self.op.rope_(x, cos, sin)
        return x

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.op.silu_mul(gate_up)

    @staticmethod
    def is_supported(device: torch.device, dtype: torch.dtype, *, hidden_size: int, intermediate_size: int,
                     head_dim: int) -> bool:
        """Whether the ops run these shapes: rows in whole 16-lane vectors, RoPE halves too."""
        return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)
                and hidden_size % 16 == 0 and intermediate_size % 16 == 0 and head_dim % 32 == 0)


LayerOps = TorchLayerOps | CpuLayerOps


def layer_ops_for(device: torch.device, dtype: torch.dtype, *, hidden_size: int, intermediate_size: int,
                  head_dim: int) -> LayerOps:
    """The fused C++ ops where they run (CPU, AVX-512, the extension built, whole vectors), else torch's."""
    if CpuLayerOps.is_supported(device, dtype, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                head_dim=head_dim):
        try:
            return CpuLayerOps()
        except OpUnavailable:  # the attention backend reports why once; these ops fall back silently
            pass
    return TorchLayerOps()
