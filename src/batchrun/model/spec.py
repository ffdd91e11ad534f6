"""Resolves `--model` (a Hugging Face model directory or a built-in name) to a ModelSpec with a fingerprint.

The fingerprint covers what changes outputs: config.json, the tokenizer files, and the weights' content (a
blake2b digest of each safetensors file, cached by weights_cache.py), so `run` refuses a plan made for another
model, or for this one before its weights changed. A model that asks to run its own code (auto_map) is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from batchrun.dtypes import dtype_name
from batchrun.errors import EXIT_USAGE, UserError
from batchrun.model.config import ModelConfig, ModelConfigError
from batchrun.model.weights_cache import weights_digest

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"builtin-tiny": BUILTIN_DIR}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # as the user gave it: a built-in name or a directory
    path: Path  # directory holding config.json and the tokenizer files
    config: ModelConfig
    builtin_seed: int | None  # built-in models: weights generated from this seed; else None (safetensors)
    fingerprint: str

    @property
    def is_builtin(self) -> bool:
        return self.builtin_seed is not None

    @property
    def location(self) -> str:
        """What names this model from anywhere: a built-in's name (its folder differs between installs), or
        the directory's absolute path."""
        return self.name if self.is_builtin else str(self.path.resolve())


def resolve_model(name: str, *, dtype: str | None = None) -> ModelSpec:
    """A built-in model name or a model directory → ModelSpec; raises UserError saying what is missing."""
    if dtype is not None:
        try:
            dtype_name(dtype)
        except ValueError as e:
            raise UserError(f"--dtype: {e}", exit_code=EXIT_USAGE) from None
    path = BUILTIN_MODELS.get(name)
    if path is None:
        path = Path(name).expanduser()
        if not path.is_dir():
            builtins = ", ".join(BUILTIN_MODELS)
            raise UserError(f"model {name!r}: not a directory and not a built-in model ({builtins})")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"model {name!r}: {config_file} does not exist")
    try:
        raw = json.loads(config_file.read_bytes())
        config = ModelConfig.from_hf(raw, dtype=dtype)
    except json.JSONDecodeError as e:
        raise UserError(f"model {name!r}: {config_file} is not valid JSON ({e})") from None
    except ModelConfigError as e:
        raise UserError(f"model {name!r}: {e}") from None
    _refuse_remote_code(name, path, raw)
    seed = raw.get("batchrun_builtin_seed")
    if seed is None and not _weight_files(path):
        raise UserError(f"model {name!r}: no *.safetensors weights in {path}")
    return ModelSpec(
        name=name,
        path=path,
        config=config,
        builtin_seed=None if seed is None else int(seed),
        fingerprint=_fingerprint(path, config.dtype),
    )


def _refuse_remote_code(name: str, path: Path, config: dict) -> None:
    """batchrun never runs a model repository's own Python code: transformers would offer to, for a
    config or tokenizer config that names classes in `auto_map`."""
    tokenizer_config = path / "tokenizer_config.json"
    sources = {"config.json": config}
    if tokenizer_config.is_file():
        try:
            sources["tokenizer_config.json"] = json.loads(tokenizer_config.read_bytes())
        except json.JSONDecodeError as e:
            raise UserError(f"model {name!r}: {tokenizer_config} is not valid JSON ({e})") from None
    for file, raw in sources.items():
        if isinstance(raw, dict) and "auto_map" in raw:
            raise UserError(f"model {name!r}: its {file} asks to run the model repository's own code (auto_map); "
                            "batchrun never runs a model's code: use a model that transformers supports natively")


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _fingerprint(path: Path, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(dtype.encode())
    for name in ("config.json", *TOKENIZER_FILES):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in _weight_files(path):
        h.update(f"{f.name}:{weights_digest(f)}".encode())
    return h.hexdigest()[:16]
