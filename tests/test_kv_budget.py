"""The run's KV budget: given sizes pass through, "auto" follows vLLM's gpu_memory_utilization rule on CUDA and
a share of MemAvailable on the CPU."""

from __future__ import annotations

import pytest
import torch

from batchrun import defaults
from batchrun.errors import UserError
from batchrun.kv_budget import (
    activation_bytes,
    cuda_kv_bytes,
    mem_available_bytes,
    parse_kv_budget,
    resolve_kv_budget,
)
from batchrun.model.spec import resolve_model

GIB = 1 << 30


def test_given_sizes_pass_through_and_bad_ones_fail_before_loading():
    assert parse_kv_budget("auto") is None and parse_kv_budget("2GiB") == 2 * GIB
    with pytest.raises(UserError, match="not a size"):
        parse_kv_budget("lots")
    config = resolve_model(defaults.BUILTIN_MODEL).config
    assert resolve_kv_budget(12345, device=torch.device("cpu"), config=config, max_step_tokens=8) == (12345, "given")


def test_cuda_rule_is_a_fraction_of_the_device_less_what_is_in_use_and_activations():
    # An H200-like device: 140 GiB, 16 GiB of weights loaded, 2 GiB of activations → 0.9 * 140 - 16 - 2.
    got = cuda_kv_bytes(free=124 * GIB, total=140 * GIB, activations=2 * GIB, fraction=0.9)
    assert abs(got - (126 - 18) * GIB) < 1024
    assert cuda_kv_bytes(free=GIB // 2, total=10 * GIB, activations=0, fraction=0.9) < 0  # nothing left


def test_activations_grow_with_the_step_and_are_dominated_by_logits_for_large_vocabularies():
    config = resolve_model(defaults.BUILTIN_MODEL).config
    one = activation_bytes(config, 1)
    assert activation_bytes(config, 2048) == 2048 * one
    assert one >= 3 * config.vocab_size * 4


def test_cpu_rule_is_a_share_of_mem_available(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert mem_available_bytes(meminfo) == 8_000_000 * 1024
    with pytest.raises(UserError, match="MemAvailable"):
        mem_available_bytes(tmp_path / "missing")
    config = resolve_model(defaults.BUILTIN_MODEL).config
    budget = resolve_kv_budget(None, device=torch.device("cpu"), config=config, max_step_tokens=8)
    # MemAvailable moves while other jobs run: within 10%.
    assert budget.num_bytes == pytest.approx(mem_available_bytes() * defaults.CPU_MEMORY_SHARE, rel=0.1)
    assert budget.how.startswith("auto: ")
