"""Builds a LlamaModel from a ModelSpec: Hugging Face safetensors (one file or sharded) or a built-in seed.

Owns the mapping from Hugging Face parameter names to the fused layout of `model.llama` and the checks that
turn a broken checkpoint into a UserError naming the file and tensor.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from batchrun.dtypes import DTYPE_BYTES
from batchrun.errors import UserError
from batchrun.model.config import ModelConfig
from batchrun.model.llama import LayerWeights, LlamaModel, ModelWeights
from batchrun.model.spec import ModelSpec
from batchrun.model.variant import VariantLayerWeights, VariantModel

INDEX_FILE = "model.safetensors.index.json"
BUILTIN_INIT_STD = 0.02


def load_model(spec: ModelSpec, *, device: torch.device, dtype: torch.dtype | None = None) -> LlamaModel:
    """Loads the weights in `dtype` (default: the spec's) onto `device`; UserError for a bad checkpoint.

    The returned model's `config.dtype` is the dtype actually loaded. Weights are read and fused one layer
    at a time on the CPU, then moved, so peak host memory stays near one layer above the file's mapping.
    """
    dtype = dtype or spec.config.torch_dtype
    config = dataclasses.replace(spec.config, dtype=_dtype_name(dtype))
    with ExitStack() as stack:
        if spec.builtin_seed is not None:
            source: _TensorSource = _BuiltinSource(config, spec.builtin_seed)
        else:
            source = _SafetensorsSource(spec.path, stack)
        weights = _assemble(config, source, device=device, dtype=dtype)
        if config.variant is None:
            return LlamaModel(config, weights)
        extras = tuple(_assemble_variant_layer(config, i, source, device=device, dtype=dtype)
                       for i in range(config.num_layers))
    return VariantModel(config, weights, extras)


def hf_parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face parameter the model reads, in the fixed order the built-in weights are drawn in.

    Order: model.embed_tokens, then per layer q, k, v, o, gate, up, down projections (with their biases
    where the architecture has them) and the two norms (then the q/k norms of Qwen3 and Gemma 3, and Gemma's
    two feed-forward norms), then model.norm, then lm_head (absent when tied).
    """
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_dim, kv_dim = config.num_heads * head_dim, config.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for proj, rows in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
            shapes[f"{attn}.{proj}_proj.weight"] = (rows, hidden)
            if config.attention_bias:
                shapes[f"{attn}.{proj}_proj.bias"] = (rows,)
        shapes[f"{attn}.o_proj.weight"] = (hidden, q_dim)
        if _has_o_bias(config):
            shapes[f"{attn}.o_proj.bias"] = (hidden,)
        shapes[f"{mlp}.gate_proj.weight"] = (inter, hidden)
        shapes[f"{mlp}.up_proj.weight"] = (inter, hidden)
        shapes[f"{mlp}.down_proj.weight"] = (hidden, inter)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
        shapes.update(_variant_shapes(config, i))
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _variant_shapes(config: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    variant, layer = config.variant, f"model.layers.{i}"
    shapes: dict[str, tuple[int, ...]] = {}
    if variant is not None and variant.qk_norm:
        shapes |= {f"{layer}.self_attn.{n}_norm.weight": (config.head_dim,) for n in ("q", "k")}
    if variant is not None and variant.is_gemma:
        shapes |= {f"{layer}.{n}_feedforward_layernorm.weight": (config.hidden_size,) for n in ("pre", "post")}
    return shapes


def _has_o_bias(config: ModelConfig) -> bool:
    # Llama's, Qwen3's and Gemma's `attention_bias` cover o_proj too; Qwen2's q/k/v biases do not.
    return config.attention_bias and config.model_type in ("llama", "qwen3", "gemma3_text")


def _dtype_name(dtype: torch.dtype) -> str:
    for name in DTYPE_BYTES:
        if getattr(torch, name) == dtype:
            return name
    raise UserError(f"dtype {dtype} is not supported (use one of {', '.join(DTYPE_BYTES)})")


class _TensorSource(Protocol):
    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor called `name` (a Hugging Face name), on the CPU, checked to have `shape`."""
        ...


class _BuiltinSource:
    """Deterministic weights: N(0, 0.02) matrices drawn in `hf_parameter_shapes` order, ones for norms,
    zeros for biases. Drawn in float32 on the CPU from one generator, so every device and dtype sees the
    same values (up to the cast)."""

    def __init__(self, config: ModelConfig, seed: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self._tensors: dict[str, torch.Tensor] = {}
        for name, shape in hf_parameter_shapes(config).items():
            if name.endswith("norm.weight"):
                self._tensors[name] = torch.ones(shape)
            elif name.endswith(".bias"):
                self._tensors[name] = torch.zeros(shape)
            else:
                self._tensors[name] = torch.empty(shape).normal_(0.0, BUILTIN_INIT_STD, generator=gen)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._tensors.pop(name)  # popped: the fused copy is all that needs to stay alive


class _SafetensorsSource:
    """Tensors from the *.safetensors files of a model directory, through its index when it is sharded."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        self._path = path
        self._stack = stack
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        index = path / INDEX_FILE
        if index.is_file():
            try:
                self._file_of = dict(json.loads(index.read_bytes())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e})") from None
        else:
            for file in sorted(path.glob("*.safetensors")):
                for name in self._open(file.name).keys():
                    self._file_of.setdefault(name, file.name)
            if not self._file_of:
                raise UserError(f"{path}: no *.safetensors weights")

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise UserError(f"{self._path}: tensor {name!r} is missing from the checkpoint ({self._where()})")
        try:
            tensor = self._open(file).get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{self._path / file}: cannot read tensor {name!r} ({e})") from None
        if tuple(tensor.shape) != shape:
            raise UserError(
                f"{self._path / file}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"config.json implies {list(shape)}"
            )
        if not tensor.is_floating_point():
            raise UserError(f"{self._path / file}: tensor {name!r} is {tensor.dtype}, not floating point")
        return tensor

    def _open(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            full = self._path / file
            if not full.is_file():
                raise UserError(f"{full}: weight file does not exist (named by {INDEX_FILE})")
            try:
                handle = self._stack.enter_context(safe_open(str(full), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                raise UserError(f"{full}: not a readable safetensors file ({e})") from None
            self._handles[file] = handle
        return handle

    def _where(self) -> str:
        index = self._path / INDEX_FILE
        return f"not in {index.name}" if index.is_file() else "in none of the *.safetensors files"


def _assemble(
    config: ModelConfig, source: _TensorSource, *, device: torch.device, dtype: torch.dtype
) -> ModelWeights:
    shapes = hf_parameter_shapes(config)

    def take(name: str) -> torch.Tensor:  # CPU, in the target dtype
        return _take(config, source, name, shapes[name], dtype)

    def put(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device).contiguous()

    embed = put(take("model.embed_tokens.weight"))
    layers = tuple(_assemble_layer(config, i, take, put) for i in range(config.num_layers))
    norm = put(take("model.norm.weight"))
    # Tied checkpoints normally omit lm_head; transformers ignores it even when present, and so do we.
    lm_head = embed if config.tie_word_embeddings else put(take("lm_head.weight"))
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def _take(config: ModelConfig, source: _TensorSource, name: str, shape: tuple[int, ...],
          dtype: torch.dtype) -> torch.Tensor:
    """The tensor on the CPU in `dtype`; Gemma's norm weights w stored as the (1 + w) they scale by."""
    tensor = source.get(name, shape)
    if config.variant is not None and config.variant.is_gemma and name.endswith("norm.weight"):
        tensor = 1.0 + tensor.float()
    return tensor.to(dtype)


def _assemble_variant_layer(config: ModelConfig, i: int, source: _TensorSource, *, device: torch.device,
                            dtype: torch.dtype) -> VariantLayerWeights:
    shapes = _variant_shapes(config, i)

    def get(name: str) -> torch.Tensor | None:
        full = f"model.layers.{i}.{name}.weight"
        return _take(config, source, full, shapes[full], dtype).to(device) if full in shapes else None

    return VariantLayerWeights(q_norm=get("self_attn.q_norm"), k_norm=get("self_attn.k_norm"),
                               pre_ff_norm=get("pre_feedforward_layernorm"),
                               post_ff_norm=get("post_feedforward_layernorm"))


def _assemble_layer(
    config: ModelConfig,
    i: int,
    take: Callable[[str], torch.Tensor],
    put: Callable[[torch.Tensor], torch.Tensor],
) -> LayerWeights:
    attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"

    def cat(names: Iterable[str]) -> torch.Tensor:
        return put(torch.cat([take(n) for n in names]))

    qkv = ("q", "k", "v")
    return LayerWeights(
        input_norm=put(take(f"model.layers.{i}.input_layernorm.weight")),
        qkv_proj=cat(f"{attn}.{p}_proj.weight" for p in qkv),
        qkv_bias=cat(f"{attn}.{p}_proj.bias" for p in qkv) if config.attention_bias else None,
        o_proj=put(take(f"{attn}.o_proj.weight")),
        o_bias=put(take(f"{attn}.o_proj.bias")) if _has_o_bias(config) else None,
        post_norm=put(take(f"model.layers.{i}.post_attention_layernorm.weight")),
        gate_up_proj=cat(f"{mlp}.{p}_proj.weight" for p in ("gate", "up")),
        down_proj=put(take(f"{mlp}.down_proj.weight")),
    )
