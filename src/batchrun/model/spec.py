"""Resolves `--model` (a built-in name, a Hugging Face model directory, or a Hub id found in the local Hugging
Face cache by huggingface_hub's own resolution, downloaded only when asked) to a ModelSpec with a fingerprint.

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
from batchrun.model.config import SUPPORTED_MODEL_TYPES, ModelConfig, ModelConfigError
from batchrun.model.weights_cache import weights_digest

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"builtin-tiny": BUILTIN_DIR}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# What a run reads from a Hub repository: a download fetches these, not the other formats repositories carry.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             *TOKENIZER_FILES]


@dataclass(frozen=True)
class ModelSpec:
    name: str  # as the user gave it: a built-in name, a directory or a Hub id
    path: Path  # directory holding config.json and the tokenizer files
    config: ModelConfig
    builtin_seed: int | None  # built-in models: weights generated from this seed; else None (safetensors)
    fingerprint: str
    repo_id: str | None = None  # a model found by its Hub id (in the Hugging Face cache)

    @property
    def is_builtin(self) -> bool:
        return self.builtin_seed is not None

    @property
    def location(self) -> str:
        """What names this model from anywhere: a built-in's name (its folder differs between installs), a Hub
        id (found again in the cache where it runs), or the directory's absolute path."""
        if self.is_builtin or self.repo_id is not None:
            return self.name
        return str(self.path.resolve())


def resolve_model(name: str, *, dtype: str | None = None, download: bool = False) -> ModelSpec:
    """A built-in model name, a model directory or a Hub id → ModelSpec; raises UserError saying what is
    missing. A Hub id is looked up in the local Hugging Face cache; `download` fetches it when it is absent."""
    if dtype is not None:
        try:
            dtype_name(dtype)
        except ValueError as e:
            raise UserError(f"--dtype: {e}", exit_code=EXIT_USAGE) from None
    path, repo_id = BUILTIN_MODELS.get(name), None
    if path is None:
        path = Path(name).expanduser()
        if not path.is_dir():
            path, repo_id = hub_snapshot(name, download=download), name
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
        repo_id=repo_id,
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


def hub_snapshot(repo_id: str, *, download: bool) -> Path:
    """The snapshot folder of Hub model `repo_id` in the Hugging Face cache (HF_HUB_CACHE), as
    huggingface_hub resolves it; fetched first when `download`. UserError listing where it looked when absent."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=not download, allow_patterns=HUB_FILES))
    except HFValidationError:
        raise UserError(_not_found(repo_id, cache=None)) from None
    except LocalEntryNotFoundError as e:
        reason = f"the download failed: {e}" if download else "nothing is downloaded unless you add --download"
        raise UserError(_not_found(repo_id, cache=f"{constants.HF_HUB_CACHE}; {reason}")) from None
    except HfHubHTTPError as e:  # a repository that does not exist, is gated, or needs a token
        raise UserError(f"model {repo_id!r}: {str(e).splitlines()[0]}") from None


def _not_found(name: str, *, cache: str | None) -> str:
    """Where the model was looked for, what is supported, and how to get a directory. `cache`: what the
    Hugging Face cache lookup found (None: `name` is not even a valid Hub id)."""
    builtins = ", ".join(BUILTIN_MODELS)
    hub = "not a Hub id" if cache is None else f"not a Hub id in the Hugging Face cache ({cache})"
    get = "" if cache is None else f"`hf download {name} --local-dir DIR`, then --model DIR, or add --download; or "
    return (f"model {name!r} not found: not a built-in model ({builtins}), not a directory "
            f"({Path(name).expanduser().absolute()}), and {hub}. Supported architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. To get a model: {get}pass a directory holding config.json, "
            "*.safetensors and the tokenizer files.")


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
