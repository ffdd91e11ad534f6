"""The dtypes batchrun runs in, by name, and their sizes: what planning needs to count KV bytes, without torch.

`model.config.ModelConfig.torch_dtype` maps a name to torch's dtype where the model is built.
"""

from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element; the keys are torch's names
_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}


def dtype_name(name: str) -> str:
    """A dtype as written in a config.json or on the command line ('bf16', 'torch.float16', ...) → its name
    in DTYPE_BYTES; ValueError when batchrun does not run in it."""
    name = str(name).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r} is not supported (use one of {', '.join(DTYPE_BYTES)})")
    return name
