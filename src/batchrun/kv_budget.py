"""The run's KV budget: `--kv-budget` as given, or "auto", sized from the machine once the weights are loaded
(on CUDA as vLLM's gpu_memory_utilization: a share of the device's memory, less what is in use and the step's
activations; on the CPU a share of MemAvailable). torch is imported only to ask CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from batchrun import defaults
from batchrun.errors import UserError
from batchrun.model.config import ModelConfig
from batchrun.sizes import human_bytes, parse_size

if TYPE_CHECKING:
    import torch


class KVBudget(NamedTuple):
    num_bytes: int
    how: str  # where the figure came from, for the user: "given", or the "auto" sizing's terms


def parse_kv_budget(option: str) -> int | None:
    """`--kv-budget`: a size such as 12GiB → bytes; "auto" → None (UserError otherwise, before any loading)."""
    return None if option == "auto" else parse_size(option)


def resolve_kv_budget(given: int | None, *, device: torch.device, config: ModelConfig, max_step_tokens: int
                      ) -> KVBudget:
    """The bytes the run's KV pool may take: `given`, or (None) sized from the machine. Call it after the
    weights are loaded: "auto" measures the memory left."""
    if given is not None:
        return KVBudget(given, "given")
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        num_bytes = cuda_kv_bytes(free=free, total=total, activations=activation_bytes(config, max_step_tokens))
        how = (f"auto: {defaults.CUDA_MEMORY_FRACTION:.0%} of {human_bytes(total)} CUDA memory, less "
               f"{human_bytes(total - free)} in use and the step's activations")
    else:
        available = mem_available_bytes()
        num_bytes = int(available * defaults.CPU_MEMORY_SHARE)
        how = f"auto: {defaults.CPU_MEMORY_SHARE:.0%} of {human_bytes(available)} available memory"
    if num_bytes < config.kv_bytes_per_token:
        raise UserError(f"no memory is left for the KV cache ({how}); give --kv-budget", exit_code=2)
    return KVBudget(num_bytes, how)


def cuda_kv_bytes(*, free: int, total: int, activations: int, fraction: float = defaults.CUDA_MEMORY_FRACTION
                  ) -> int:
    """What `fraction` of the device leaves for KV once what is in use (weights, other processes) and the
    activations are counted (negative when nothing is left)."""
    return int(fraction * total) - (total - free) - activations


def activation_bytes(config: ModelConfig, max_step_tokens: int) -> int:
    """An upper estimate of a step's live activations: per row, the residual stream and its norm, q/k/v, the
    attention output and its float32 merge state, the MLP's gate and up; and the float32 logits of every row
    (with the sampler's copies). The logits dominate for large vocabularies."""
    c = config
    per_row = (4 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 3 * c.intermediate_size
               ) * c.dtype_bytes + 3 * c.num_heads * (c.head_dim + 1) * 4
    return max_step_tokens * (per_row + 3 * c.vocab_size * 4)


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable (what the kernel can give without swapping), in bytes."""
    try:
        text = meminfo.read_text()
    except OSError:
        text = ""  # not Linux
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise UserError(f"{meminfo} has no MemAvailable line: give --kv-budget", exit_code=2)
