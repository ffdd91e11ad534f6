"""What batchrun needs to know about a model: its architecture numbers, read from a Hugging Face config.json.

Owns the list of supported architectures and the KV-memory arithmetic that the planner and the engine share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchrun.dtypes import DTYPE_BYTES, dtype_name

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
GEMMA_ACT = "gelu_pytorch_tanh"


class ModelConfigError(ValueError):
    """The model's config.json cannot be used (unsupported architecture, missing or bad field)."""


@dataclass(frozen=True)
class RopeScaling:
    """The llama3 frequency rescaling (rope_type 'llama3'); other rope types are refused when loading."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LinearRopeScaling:
    """RoPE type 'linear': every inverse frequency divided by `factor` (Gemma 3's full-attention layers)."""

    factor: float


@dataclass(frozen=True)
class DecoderVariant:
    """What Qwen3 and Gemma 3 change in the Llama decoder (`model.variant` implements it)."""

    qk_norm: bool  # an RMS norm over each head's q and k, before RoPE
    # Gemma: (1 + w) norms scaled in float32, attention and MLP outputs normed before their residual add
    # (four norms a layer), a GELU-tanh MLP, embeddings scaled by sqrt(hidden_size).
    is_gemma: bool
    sm_scale: float  # softmax scale: Gemma's query_pre_attn_scalar ** -0.5, else head_dim ** -0.5
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    local_rope_theta: float | None = None  # RoPE base of Gemma 3's sliding-window layers
    is_local_layer: tuple[bool, ...] = ()  # per layer: a sliding-window layer (its own RoPE base, unscaled)

    def __post_init__(self) -> None:
        assert (self.local_rope_theta is None) == (not any(self.is_local_layer)), self


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | LinearRopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str
    # Attention of some layers sees only this many recent tokens; batchrun caps the context at it instead.
    sliding_window: int | None = None
    variant: DecoderVariant | None = None  # Qwen3, Gemma 3; None: the Llama decoder as it is

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of KV heads"
        assert self.dtype in DTYPE_BYTES, self.dtype
        assert self.variant is None or len(self.variant.is_local_layer) in (0, self.num_layers), self.variant

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # only where the model is built: planning and reporting import no torch

        return getattr(torch, self.dtype)

    @property
    def max_context_len(self) -> int:
        """The longest prompt plus max_tokens batchrun runs: the model's context, capped at a sliding window
        (within it, windowed attention sees every token, so full attention computes the same)."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def context_name(self) -> str:
        """What limits `max_context_len`, for messages."""
        if self.max_context_len < self.max_position_embeddings:
            return "the model's sliding window (batchrun caps the context at the window)"
        return "the model's context"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token holds across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_hf(cls, raw: dict[str, Any], *, dtype: str | None = None) -> ModelConfig:
        """Reads a Hugging Face config.json dict; raises ModelConfigError naming the field at fault."""
        if not isinstance(raw, dict):
            raise ModelConfigError("config.json is not a JSON object")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            _check_features(raw, model_type)
            num_heads = _count(raw, "num_attention_heads")
            hidden = _count(raw, "hidden_size")
            num_kv_heads = _count(raw, "num_key_value_heads", default=num_heads)
            if num_heads % num_kv_heads:
                raise ModelConfigError(f"num_attention_heads {num_heads} is not a multiple of "
                                       f"num_key_value_heads {num_kv_heads}")
            head_dim = _count(raw, "head_dim", default=max(hidden // num_heads, 1))
            eos = raw.get("eos_token_id")
            eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
            eos_ids = tuple(_token_id(e, "eos_token_id") for e in eos_list)
            cfg_dtype = dtype_name(dtype or raw.get("torch_dtype") or raw.get("dtype") or "float32")
            max_pos = _count(raw, "max_position_embeddings", default=2048)
            # transformers 5 writes `rope_parameters` (rope_theta inside it); older configs a top-level
            # `rope_theta` plus an optional `rope_scaling`. As in transformers, rope_parameters wins.
            rope = _rope_params(raw, model_type)
            return cls(
                model_type=model_type,
                vocab_size=_count(raw, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_count(raw, "intermediate_size"),
                num_layers=_count(raw, "num_hidden_layers"),
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                max_position_embeddings=max_pos,
                rms_norm_eps=_positive(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
                rope_theta=_positive(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0, "rope_theta"),
                rope_scaling=_rope_scaling(rope, max_pos),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=_attention_bias(raw, model_type),
                bos_token_id=None if raw.get("bos_token_id") is None else _token_id(raw["bos_token_id"],
                                                                                    "bos_token_id"),
                eos_token_ids=eos_ids,
                dtype=cfg_dtype,
                sliding_window=_sliding_window(raw, model_type, max_pos),
                variant=_variant(raw, model_type, head_dim=head_dim),
            )
        except KeyError as e:
            raise ModelConfigError(f"config.json has no field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelConfigError(f"config.json has a bad value: {e}") from None


def _count(raw: dict[str, Any], key: str, *, default: int | None = None) -> int:
    """A positive integer field (absent or null: `default`); ModelConfigError naming it otherwise."""
    value = raw.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise KeyError(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value >= 1 << 40:
        raise ModelConfigError(f"config.json field {key!r} must be a positive integer, not {value!r}")
    return value


def _token_id(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelConfigError(f"config.json field {key!r} must hold token ids (integers >= 0), not {value!r}")
    return value


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ModelConfigError(f"config.json field {key!r} must be a positive number, not {value!r}")
    return float(value)


def _rope_params(raw: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The RoPE parameters (of the full-attention layers, for Gemma 3). transformers 5 writes
    `rope_parameters` (rope_theta inside it; Gemma 3: one entry per layer type); older configs a top-level
    `rope_theta` plus an optional `rope_scaling`. As in transformers, rope_parameters wins."""
    params = raw.get("rope_parameters") or {}
    if model_type == "gemma3_text":
        return dict(params.get("full_attention") or {"rope_theta": raw.get("rope_theta", 1_000_000.0),
                                                     **(raw.get("rope_scaling") or {})})
    return dict(params or raw.get("rope_scaling") or {})


def _variant(raw: dict[str, Any], model_type: str, *, head_dim: int) -> DecoderVariant | None:
    if model_type == "qwen3":
        return DecoderVariant(qk_norm=True, is_gemma=False, sm_scale=head_dim**-0.5)
    if model_type != "gemma3_text":
        return None
    local = (raw.get("rope_parameters") or {}).get("sliding_attention") or {
        "rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    if _rope_scaling(local, 0) is not None:
        raise ModelConfigError("a scaled RoPE on Gemma 3's sliding-window layers is not supported")
    is_local = tuple(t == "sliding_attention" for t in _layer_types(raw))
    softcap = raw.get("final_logit_softcapping")
    return DecoderVariant(
        qk_norm=True, is_gemma=True, sm_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        final_logit_softcapping=None if softcap is None else float(softcap),
        local_rope_theta=float(local["rope_theta"]) if any(is_local) else None, is_local_layer=is_local,
    )


def _layer_types(raw: dict[str, Any]) -> list[str]:
    """Gemma 3's attention type per layer: as the config lists them, else its old pattern (every 6th full)."""
    num_layers = int(raw["num_hidden_layers"])
    pattern = int(raw.get("sliding_window_pattern", 6))
    return raw.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                      for i in range(num_layers)]


def _sliding_window(raw: dict[str, Any], model_type: str, max_pos: int) -> int | None:
    """The window of the model's sliding-window layers when it can mask something (shorter than the context),
    else None. Mistral windows every layer; Qwen2/3 when use_sliding_window; Gemma 3 its local layers."""
    window = raw.get("sliding_window")
    if model_type == "gemma3_text":
        is_windowed = "sliding_attention" in _layer_types(raw)
    elif raw.get("layer_types"):
        is_windowed = "sliding_attention" in raw["layer_types"]
    else:
        is_windowed = model_type == "mistral" or bool(raw.get("use_sliding_window"))
    if not is_windowed or window is None or int(window) >= max_pos:
        return None
    return int(window)


def _rope_scaling(raw: dict[str, Any], max_position_embeddings: int) -> RopeScaling | LinearRopeScaling | None:
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return LinearRopeScaling(factor=float(raw["factor"]))
    if rope_type != "llama3":
        raise ModelConfigError(f"rope_scaling type {rope_type!r} is not supported (supported: llama3, linear)")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        # transformers falls back to max_position_embeddings when the field is absent; so do we.
        original_max_position_embeddings=int(
            raw.get("original_max_position_embeddings", max_position_embeddings)
        ),
    )


def _attention_bias(raw: dict[str, Any], model_type: str) -> bool:
    # Qwen2 always has q/k/v biases and Mistral never has any, whatever the config says; Llama follows
    # `attention_bias` (which then also covers o_proj).
    if model_type == "qwen2":
        return True
    if model_type == "mistral":
        return False
    return bool(raw.get("attention_bias", False))  # Llama, Qwen3, Gemma 3: q/k/v and o biases


def _check_features(raw: dict[str, Any], model_type: str) -> None:
    """Refuses configs that ask for something the forward pass does not implement, naming the field."""
    if model_type == "gemma3_text":
        _check_gemma_features(raw)
    else:
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"hidden_act {act!r} is not supported (supported: silu)")
    if raw.get("mlp_bias"):
        raise ModelConfigError("mlp_bias true is not supported")
    rope = raw.get("rope_parameters") or {}
    if raw.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelConfigError("partial_rotary_factor other than 1.0 is not supported")


def _check_gemma_features(raw: dict[str, Any]) -> None:
    act = raw.get("hidden_activation") or raw.get("hidden_act") or GEMMA_ACT
    if act != GEMMA_ACT:
        raise ModelConfigError(f"hidden_activation {act!r} is not supported (supported: {GEMMA_ACT})")
    # Soft-capped attention logits would need the attention backends to cap every score; Gemma 3 has none.
    if raw.get("attn_logit_softcapping") is not None:
        raise ModelConfigError("attn_logit_softcapping is not supported (Gemma 3's released configs set none)")
    if raw.get("use_bidirectional_attention"):
        raise ModelConfigError("use_bidirectional_attention is not supported: batchrun runs causal decoders")
