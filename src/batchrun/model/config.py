"""What batchrun needs to know about a model: its architecture numbers, read from a Hugging Face config.json.

Owns the list of supported architectures and the KV-memory arithmetic that the planner and the engine share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchrun.dtypes import DTYPE_BYTES, dtype_name

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str
    # Attention of some layers sees only this many recent tokens; batchrun caps the context at it instead.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of KV heads"
        assert self.dtype in DTYPE_BYTES, self.dtype

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
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            _check_features(raw, model_type)
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            eos = raw.get("eos_token_id")
            eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
            eos_ids = tuple(int(e) for e in eos_list)
            cfg_dtype = dtype_name(dtype or raw.get("torch_dtype") or raw.get("dtype") or "float32")
            max_pos = int(raw.get("max_position_embeddings", 2048))
            # transformers 5 writes `rope_parameters` (rope_theta inside it); older configs a top-level
            # `rope_theta` plus an optional `rope_scaling`. As in transformers, rope_parameters wins.
            rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
            return cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden // num_heads),
                max_position_embeddings=max_pos,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0),
                rope_scaling=_rope_scaling(rope, max_pos),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=_attention_bias(raw, model_type),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                dtype=cfg_dtype,
            )
        except KeyError as e:
            raise ModelConfigError(f"config.json has no field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelConfigError(f"config.json has a bad value: {e}") from None


def _rope_scaling(raw: dict[str, Any], max_position_embeddings: int) -> RopeScaling | None:
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ModelConfigError(f"rope_scaling type {rope_type!r} is not supported (supported: llama3)")
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
    return bool(raw.get("attention_bias", False))


def _check_features(raw: dict[str, Any], model_type: str) -> None:
    """Refuses configs that ask for something the forward pass does not implement, naming the field."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"hidden_act {act!r} is not supported (supported: silu)")
    if raw.get("mlp_bias"):
        raise ModelConfigError("mlp_bias true is not supported")
    rope = raw.get("rope_parameters") or {}
    if raw.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelConfigError("partial_rotary_factor other than 1.0 is not supported")
    # Sliding-window attention is not implemented; a window at least as long as the longest sequence the
    # model accepts never masks anything, so only a shorter one is refused.
    window = raw.get("sliding_window")
    uses_window = model_type == "mistral" or (model_type == "qwen2" and raw.get("use_sliding_window"))
    max_pos = int(raw.get("max_position_embeddings", 2048))
    if uses_window and window is not None and int(window) < max_pos:
        raise ModelConfigError(
            f"sliding_window {window} is smaller than max_position_embeddings {max_pos}: "
            "sliding-window attention is not supported"
        )
