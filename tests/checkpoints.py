"""Tiny random-weight Hugging Face checkpoints for tests, written with transformers' `save_pretrained`.

    make_checkpoint(tmp_dir, arch="llama", *, name=None, seed=0, init_std=0.15, dtype="float32",
                    max_shard_size=None, **config_overrides) -> Path

Writes `tmp_dir / (name or arch)`: config.json, model.safetensors (sharded with an index when
`max_shard_size` is small, e.g. "100KB"), generation_config.json, and the built-in tokenizer's files (vocab
4096, bos 0, eos 1), so token ids and prompts mean the same as with `builtin-tiny`. Same seed and
arguments → same weights. `arch` is one of ARCHS:
  "llama"        GQA 4:2, untied embeddings
  "qwen2"        Qwen2, q/k/v biases, GQA 4:2
  "mistral"      Mistral, sliding_window (4096) larger than max_position_embeddings (so full attention)
  "llama-tied"   tied input/output embeddings
  "llama3-rope"  llama3 rope scaling (theta 5e5, factor 8, original context 64: all three frequency bands)
  "qwen3"        Qwen3: q/k RMS norms per head, GQA 4:2
  "gemma3"       Gemma 3 text: (1 + w) norms, pre/post feed-forward norms, q/k norms, GELU-tanh, tied and
                 scaled embeddings, query_pre_attn_scalar 24, final logit soft-cap 30, a sliding-window layer
                 (window 64, RoPE base 100) then a full one (base 5000, linear scaling x2)
  "mistral-window" Mistral with sliding_window 64, below max_position_embeddings (batchrun caps the context)
Every model: hidden 64, 2 layers, 4 query heads of dim 16, intermediate 128, max_position_embeddings 512.
Weights are N(0, init_std) (0.15: greedy decoding then gives varied tokens), norm weights 1 + N(0, 0.1)
and biases N(0, 0.1), so a swapped norm or a dropped bias changes the outputs. `config_overrides` go to the
transformers config class (e.g. num_hidden_layers=3, tie_word_embeddings=True).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "src" / "batchrun" / "model" / "builtin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ARCHS = ("llama", "qwen2", "mistral", "llama-tied", "llama3-rope", "qwen3", "gemma3", "mistral-window")
WINDOW = 64  # the sliding window of "gemma3" and "mistral-window"

_COMMON: dict[str, Any] = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
)
_LLAMA3_ROPE: dict[str, Any] = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def make_checkpoint(
    tmp_dir: Path | str,
    arch: str = "llama",
    *,
    name: str | None = None,
    seed: int = 0,
    init_std: float = 0.15,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Writes a tiny random-weight model directory for `arch` and returns its path (see the module doc)."""
    config = _config(arch, init_std=init_std, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param_name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model = model.to(getattr(torch, dtype))
    out = Path(tmp_dir) / (name or arch)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    for file in TOKENIZER_FILES:
        shutil.copy(BUILTIN_DIR / file, out / file)
    return out


def _config(arch: str, *, init_std: float, **overrides: Any) -> PretrainedConfig:
    kwargs = {**_COMMON, "initializer_range": init_std}
    if arch in ("llama", "llama-tied", "llama3-rope"):
        cls: type[PretrainedConfig] = LlamaConfig
        if arch == "llama-tied":
            kwargs["tie_word_embeddings"] = True
        if arch == "llama3-rope":
            # rope_theta + rope_scaling is the layout both transformers 4 and 5 accept as arguments.
            kwargs.update(rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE))
    elif arch == "qwen2":
        cls = Qwen2Config
        kwargs.pop("head_dim")  # Qwen2 derives it: 64 / 4
    elif arch in ("mistral", "mistral-window"):
        cls = MistralConfig
        kwargs["sliding_window"] = 4096 if arch == "mistral" else WINDOW
    elif arch == "qwen3":
        cls = Qwen3Config
    elif arch == "gemma3":
        cls = Gemma3TextConfig
        kwargs.update(tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention"],
                      sliding_window=WINDOW, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                      rope_local_base_freq=100.0, rope_theta=5000.0,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    else:
        raise ValueError(f"arch {arch!r} is not one of {ARCHS}")
    kwargs.update(overrides)
    return cls(**kwargs)
