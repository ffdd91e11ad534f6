"""Qwen3 and Gemma 3 text: the Llama decoder with what `ModelConfig.variant` changes, as a LlamaModel subclass
over the same flat ragged batch and attention callback: per-head q/k norms before RoPE; for Gemma, (1 + w)
norms scaled in float32 around attention and MLP, GELU-tanh, scaled embeddings, a RoPE base per layer type,
the softmax scale from query_pre_attn_scalar and final logit soft-capping. Op order follows transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchrun.model.config import DecoderVariant, ModelConfig
from batchrun.model.layer_ops import TorchLayerOps, apply_rope, rms_norm
from batchrun.model.llama import AttentionFn, LayerWeights, LlamaModel, ModelWeights, rope_tables


@dataclass(frozen=True, eq=False)  # tensors: identity, not elementwise ==
class VariantLayerWeights:
    """A layer's weights beyond LayerWeights. Gemma: LayerWeights.post_norm norms the attention output, and
    the MLP has its own input and output norms. Gemma's norm weights are stored as the (1 + w) they scale by."""

    q_norm: torch.Tensor | None  # [D]
    k_norm: torch.Tensor | None  # [D]
    pre_ff_norm: torch.Tensor | None  # [H]
    post_ff_norm: torch.Tensor | None  # [H]


class VariantModel(LlamaModel):
    """LlamaModel's contract (forward -> the residual stream before the final norm; compute_logits) for the
    decoders of `ModelConfig.variant`."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, extras: tuple[VariantLayerWeights, ...]) -> None:
        super().__init__(config, weights, TorchLayerOps())  # its norms and RoPE are its own: torch's ops
        assert config.variant is not None and len(extras) == config.num_layers
        self.variant: DecoderVariant = config.variant
        self.extras = extras
        self.sm_scale = self.variant.sm_scale
        # One (cos, sin) pair per RoPE base: [0] the config's (LlamaModel's tables), [1] Gemma's local layers.
        self._tables = [(self._rope_cos, self._rope_sin)]
        if self.variant.local_rope_theta is not None:
            cos, sin = rope_tables(dataclasses.replace(config, rope_theta=self.variant.local_rope_theta,
                                                       rope_scaling=None))
            self._tables.append((cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)))
        self._layer_table = [int(is_local) for is_local in self.variant.is_local_layer] or [0] * config.num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """input_ids, positions: int64 [N] -> hidden [N, H], as LlamaModel.forward (q and k are contiguous here)."""
        tables = [(cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)) for cos, sin in self._tables]  # [N,1,D]
        hidden = F.embedding(input_ids, self.weights.embed)  # [N, H]
        if self.variant.is_gemma:
            # transformers scales by sqrt(hidden_size) rounded to the weights' dtype.
            hidden = hidden * torch.tensor(self.config.hidden_size**0.5, dtype=self.dtype)
        for i, (layer, extra) in enumerate(zip(self.weights.layers, self.extras, strict=True)):
            o = self._attention(i, self._norm(hidden, layer.input_norm), layer, extra, tables[self._layer_table[i]],
                                attention)
            hidden = self._residuals(hidden, o, layer, extra)
        return hidden

    def _attention(self, i: int, x: torch.Tensor, layer: LayerWeights, extra: VariantLayerWeights,
                   rope: tuple[torch.Tensor, torch.Tensor], attention: AttentionFn) -> torch.Tensor:
        """The attention block's output [N, H] (o_proj applied, before any output norm)."""
        cfg, num_tokens = self.config, x.shape[0]
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv = F.linear(x, layer.qkv_proj, layer.qkv_bias)  # [N, (Hq + 2 * Hkv) * D]
        q = qkv[:, :q_dim].view(num_tokens, cfg.num_heads, cfg.head_dim)
        k = qkv[:, q_dim : q_dim + kv_dim].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, q_dim + kv_dim :].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if extra.q_norm is not None and extra.k_norm is not None:
            q, k = self._norm(q, extra.q_norm), self._norm(k, extra.k_norm)  # over each head's D
        cos, sin = rope
        o = attention(i, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # [N, Hq, D]
        o = o.reshape(num_tokens, q_dim).to(self.dtype)
        return F.linear(o, layer.o_proj, layer.o_bias)

    def _residuals(self, hidden: torch.Tensor, attn_out: torch.Tensor, layer: LayerWeights,
                   extra: VariantLayerWeights) -> torch.Tensor:
        """The stream [N, H] after the layer: the attention output added (normed first, for Gemma), then the
        MLP's output on the updated stream (Gemma: between its own input and output norms)."""
        if not self.variant.is_gemma:
            hidden = hidden + attn_out
            gate, up = F.linear(self._norm(hidden, layer.post_norm), layer.gate_up_proj).chunk(2, dim=-1)
            return hidden + F.linear(F.silu(gate) * up, layer.down_proj)
        assert extra.pre_ff_norm is not None and extra.post_ff_norm is not None
        hidden = hidden + self._norm(attn_out, layer.post_norm)
        gate, up = F.linear(self._norm(hidden, extra.pre_ff_norm), layer.gate_up_proj).chunk(2, dim=-1)  # [N, I]
        return hidden + self._norm(F.linear(F.gelu(gate, approximate="tanh") * up, layer.down_proj), extra.post_ff_norm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] -> float32 logits [M, V]: final norm, lm_head, then Gemma's soft-cap (model dtype)."""
        logits = F.linear(self._norm(hidden, self.weights.norm), self.weights.lm_head)
        cap = self.variant.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMS norm over the last dim. Gemma scales in float32 before casting back (Llama-style norms cast first)."""
        eps = self.config.rms_norm_eps
        if self.variant.is_gemma:
            return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)
        return rms_norm(x, weight, eps)
