"""Tile sizes, warps and pipeline stages of the cascade kernel per head size, dtype, GPU generation and tile class
(a "large" tile serves a segment of many query rows, a "small" one a decode sequence), and the tests' override.
The choices are checked by tests/test_kernel_compile.py: every one compiles for sm_80 and sm_90 without spills."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

HEAD_DIMS = (64, 80, 96, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CAPABILITIES = (80, 90)  # sm_80 (A100) and sm_90 (H100/H200); newer GPUs get the sm_90 choices
# The GPU compiler refuses dots under 16 rows or keys.
MIN_BLOCK = 16


class TileConfig(NamedTuple):
    block_m: int  # tile rows: query tokens x the GQA group's heads
    block_n: int  # keys per inner-loop iteration
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchConfig:
    """Explicit tile sizes and split count (tests and benchmarks); None keeps the tuned choice."""

    block_m: int | None = None
    block_n: int | None = None
    num_splits: int | None = None

    def __post_init__(self) -> None:
        for block in (self.block_m, self.block_n):
            assert block is None or block >= MIN_BLOCK, f"block sizes must be >= {MIN_BLOCK}, got {block}"
            assert block is None or block & (block - 1) == 0, f"block sizes are powers of two, got {block}"
        assert self.num_splits is None or self.num_splits >= 1, "num_splits must be >= 1"


def small_block_m(group: int) -> int:
    """Rows of a decode tile: one token's group of heads, at least a dot's 16 rows."""
    return max(MIN_BLOCK, triton.next_power_of_2(group))


def tile_config(
    *, head_dim: int, dtype: torch.dtype, group: int, capability: int, is_large: bool
) -> TileConfig:
    """The tuned choice. Register budget: 255 per thread; the fp32 accumulator [BLOCK_M, BLOCK_D] alone takes
    BLOCK_M * BLOCK_D / (32 * num_warps) of them, the q tile as many again (half in fp16/bf16), the score tile
    BLOCK_M * BLOCK_N / (32 * num_warps). Shared memory per stage: the K and V blocks, 2 * BLOCK_N * BLOCK_D
    elements (sm_80: 163 KB per block, sm_90: 227 KB)."""
    assert head_dim in HEAD_DIMS and dtype in DTYPES, f"no tile config for D={head_dim}, {dtype}"
    is_fp32 = dtype == torch.float32
    if is_fp32:
        # fp32 dots (ieee: FMA units, no tensor cores) hold q and k in registers at twice the bytes: 8 warps
        # and 32-key blocks keep them spill-free. sm_90 lays those dots out less densely: at D > 64 only
        # 16-row tiles fit (32 rows spill 264 bytes). fp32 is the exactness path; bf16 is the fast one.
        block_m = 16 if not is_large or (capability >= 90 and head_dim > 64) else 32
        return TileConfig(max(block_m, small_block_m(group)), 32, 8, 2)
    if not is_large:
        # Decode: a few live rows, so a wide key block keeps more bytes in flight per program; 4 warps hold
        # the [16, 128] accumulator in 16 registers a thread.
        return TileConfig(small_block_m(group), 64, 4, 2)
    # fp16/bf16: 128-row tiles halve the re-reads of a long prefix against 64-row ones; 8 warps keep the
    # [128, 128] fp32 accumulator at 64 registers a thread. K + V blocks of 64 keys take 32 KB a stage at
    # D = 128: sm_90's larger shared memory pays for a third stage at D <= 64 where the loop is shortest.
    num_stages = 3 if capability >= 90 and head_dim <= 64 else 2
    return TileConfig(max(128, small_block_m(group)), 64, 8, num_stages)


def apply_override(tile: TileConfig, config: LaunchConfig) -> TileConfig:
    if config.block_m is None and config.block_n is None:
        return tile
    block_m = config.block_m or tile.block_m
    block_n = config.block_n or tile.block_n
    return TileConfig(block_m, block_n, 4 if block_m * block_n <= 64 * 64 else 8, tile.num_stages)
