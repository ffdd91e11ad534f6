"""The Llama-family decoder (Llama, Mistral, Qwen2) over a flat ragged batch, with attention as a callback.

Owns the forward numerics (kept op-for-op close to transformers so greedy fp32 tokens match) and the RoPE
tables; weights arrive already fused from `model.loader`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchrun.model.config import LinearRopeScaling, ModelConfig, RopeScaling
from batchrun.model.layer_ops import LayerOps, layer_ops_for

# attention(layer, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D]) -> o [N, Hq, D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)  # tensors: identity, not elementwise ==
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused so each takes one matmul per step."""

    input_norm: torch.Tensor  # [H]
    qkv_proj: torch.Tensor  # [(Hq + 2 * Hkv) * D, H], rows q | k | v
    qkv_bias: torch.Tensor | None  # [(Hq + 2 * Hkv) * D]
    o_proj: torch.Tensor  # [H, Hq * D]
    o_bias: torch.Tensor | None  # [H]
    post_norm: torch.Tensor  # [H]
    gate_up_proj: torch.Tensor  # [2 * I, H], rows gate | up
    down_proj: torch.Tensor  # [H, I]


@dataclass(frozen=True, eq=False)  # tensors: identity, not elementwise ==
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; the same tensor as `embed` when the embeddings are tied


class LlamaModel:
    """Forward over a flat ragged batch; sequence boundaries are known to the attention callback only.

    Weights are plain tensors (no autograd). `forward` returns the residual stream *before* the final norm;
    `compute_logits` applies the final norm, so the engine pays for it only on the rows it samples from.
    The elementwise work runs through `ops` (default: `layer_ops_for` the weights' device and dtype).
    """

    def __init__(self, config: ModelConfig, weights: ModelWeights, ops: LayerOps | None = None) -> None:
        assert len(weights.layers) == config.num_layers
        self.config = config
        self.weights = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        assert self.dtype == config.torch_dtype, (self.dtype, config.dtype)
        self.sm_scale = config.head_dim**-0.5  # softmax scale the attention callback should use
        self._num_qk_heads = config.num_heads + config.num_kv_heads
        cos, sin = rope_tables(config)
        # Cast as transformers does (cos/sin in the activation dtype); `sin` carries rotate_half's sign.
        self._rope_cos = cos.to(device=self.device, dtype=self.dtype)  # [P, D]
        self._rope_sin = sin.to(device=self.device, dtype=self.dtype)  # [P, D]
        self.ops = ops or layer_ops_for(self.device, self.dtype, hidden_size=config.hidden_size,
                                        intermediate_size=config.intermediate_size, head_dim=config.head_dim)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn
    ) -> torch.Tensor:
        """input_ids, positions: int64 [N] on `device` (positions < max_position_embeddings) -> hidden [N, H].

        The callback gets post-RoPE q, k and v in the model dtype; they are views into the fused projection
        (unit stride in the last dim, rows strided), so a kernel that needs contiguous rows must copy.
        It may return o in float32 or the model dtype.
        """
        cfg, ops = self.config, self.ops
        num_tokens = input_ids.shape[0]
        head_dim, num_heads, eps = cfg.head_dim, cfg.num_heads, cfg.rms_norm_eps
        qk_dim = self._num_qk_heads * head_dim
        cos, sin = self._rope_cos[positions], self._rope_sin[positions]  # [N, D] each
        hidden = F.embedding(input_ids, self.weights.embed)  # [N, H]
        mlp_out: torch.Tensor | None = None  # the previous layer's MLP output, added with the next norm
        for i, layer in enumerate(self.weights.layers):
            x = ops.add_rms_norm(hidden, mlp_out, layer.input_norm, eps)
            qkv = F.linear(x, layer.qkv_proj, layer.qkv_bias)  # [N, (Hq + 2 * Hkv) * D]
            # q and k are adjacent in the fused output, so one RoPE application covers both.
            qk = ops.rope(qkv[:, :qk_dim].view(num_tokens, self._num_qk_heads, head_dim), cos, sin)
            v = qkv[:, qk_dim:].view(num_tokens, cfg.num_kv_heads, head_dim)  # [N, Hkv, D]
            o = attention(i, qk[:, :num_heads], qk[:, num_heads:], v)  # [N, Hq, D]
            o = o.reshape(num_tokens, num_heads * head_dim).to(self.dtype)
            # The residual adds are in place (the roundings of `hidden + ...`): no new residual stream per layer.
            x = ops.add_rms_norm(hidden, F.linear(o, layer.o_proj, layer.o_bias), layer.post_norm, eps)
            mlp_out = F.linear(ops.silu_mul(F.linear(x, layer.gate_up_proj)), layer.down_proj)
        if mlp_out is not None:
            hidden.add_(mlp_out)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] from `forward` -> float32 logits [M, V] (final norm applied here)."""
        x = self.ops.add_rms_norm(hidden, None, self.weights.norm, self.config.rms_norm_eps)
        # The product runs in the model dtype, as transformers' lm_head does; only the result is widened.
        return F.linear(x, self.weights.lm_head).float()


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, signed sin), each [max_position_embeddings, D], built on the CPU.

    The signed sin is (-sin, sin) over the two halves, for `layer_ops.apply_rope`.
    """
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)  # [D/2]
    positions = torch.arange(config.max_position_embeddings, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2], the same products transformers forms
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    half = config.head_dim // 2
    sin = emb.sin()
    sin[:, :half].neg_()
    return emb.cos(), sin


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | LinearRopeScaling | None) -> torch.Tensor:
    """float32 [D/2] inverse frequencies, computed as transformers' default, linear and llama3 RoPE initialisers."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return inv_freq / scaling.factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
