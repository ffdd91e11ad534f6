"""A step's work list and its launches: `prepare_step` turns the step's attention parts (host arrays) into one work
list, copied to the device in one transfer; `attend` runs it for one layer: one launch per tile class (at most
two: decode tiles and large tiles) computes the own part and every prefix depth, merged, with no device sync."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .cascade import cascade_kernel
from .configs import DTYPES, HEAD_DIMS, LaunchConfig, TileConfig, apply_override, small_block_m, tile_config
from .worklist import Items, Part, WorkList, bind_items, make_segments, make_tiles, pick_chunk, split_keys

# The interpreter's tl.dot on bf16 returns garbage (Triton issue #11584), so tiles are upcast to fp32 there.
# Read once, as triton.jit decides at decoration time whether kernels are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class StepWork:
    """One step's work list on the device, reused by every layer. tiles[c] launches items[c]."""

    num_rows: int  # output rows (= rows of q)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    tiles: tuple[TileConfig, ...]
    items: tuple[torch.Tensor, ...]  # int32 [I, ITEM_FIELDS] per tile class, none empty
    segments: torch.Tensor  # int32 [S, SEG_FIELDS]
    kv_indices: torch.Tensor  # int32
    num_parts: torch.Tensor  # int32 [num_rows]
    part_indptr: torch.Tensor  # int32 [num_rows + 1]
    part_rows: torch.Tensor  # int32
    counters: torch.Tensor  # int32 [num_rows * num_heads], zero between launches (the mergers re-arm them)
    num_partial_rows: int
    is_covered: bool

    def __post_init__(self) -> None:
        assert len(self.tiles) == len(self.items) and all(len(i) for i in self.items), "no empty launch"
        assert self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of KV heads"


@functools.lru_cache(maxsize=8)
def _device_info(device: torch.device) -> tuple[int, int]:
    """(capability as 80 or 90, programs that fill the device: two per SM)."""
    if device.type != "cuda" or INTERPRET:
        return 80, 1
    props = torch.cuda.get_device_properties(device)
    return (90 if props.major >= 9 else 80), 2 * props.multi_processor_count


def _to_device(device: torch.device, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """One host-to-device copy for all of them; each starts 16-byte aligned, as Triton specializes on that."""
    sizes = [-(-a.size // 4) * 4 for a in arrays]
    buf = np.zeros(max(sum(sizes), 4), np.int32)
    offsets = np.cumsum([0, *sizes])
    for a, off in zip(arrays, offsets, strict=False):
        buf[off : off + a.size] = a.reshape(-1)
    host = torch.from_numpy(buf)
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return [dev[off : off + a.size].view(a.shape) for a, off in zip(arrays, offsets, strict=False)]


def prepare_parts(
    parts: Sequence[Part], *, num_rows: int, num_heads: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device, config: LaunchConfig | None = None, capability: int | None = None,
) -> StepWork:
    """The work list of any attention parts writing output rows [0, num_rows) (`prepare_step` for the engine).
    capability: the GPU generation (80, 90) to pick tiles for; None: the device's (aot.py prepares on the CPU)."""
    assert head_dim in HEAD_DIMS and dtype in DTYPES, f"head size {head_dim} / {dtype}: not {HEAD_DIMS} / {DTYPES}"
    assert num_heads % num_kv_heads == 0, f"GQA ratio {num_heads} / {num_kv_heads} is not whole"
    config = config or LaunchConfig()
    group = num_heads // num_kv_heads
    device_capability, num_programs = _device_info(torch.device(device))
    capability = capability or device_capability
    tiles = [apply_override(tile_config(head_dim=head_dim, dtype=dtype, group=group, capability=capability,
                                        is_large=is_large), config) for is_large in (False, True)]
    assert all(t.block_m >= group for t in tiles), f"block_m must hold a token's {group} heads"
    seg = make_segments(parts)
    # Segments of a few rows (decode sequences) take small tiles; a segment with half a large tile of rows
    # or more reads its keys once per large tile.
    is_large = seg.q_len * group >= max(tiles[1].block_m // 2, small_block_m(group) + 1)
    if tiles[0] == tiles[1]:  # one class, one launch
        is_large[:] = False
    seg_tiles = [
        make_tiles(np.flatnonzero(is_large == want), seg.q_len, seg.kv_len, seg.table[:, 3].astype(np.int64),
                   t.block_m // group)
        for want, t in zip((False, True), tiles, strict=True)
    ]
    block_n = max(t.block_n for t in tiles)
    if config.num_splits is not None:
        max_kv = int(seg.kv_len.max(initial=1))
        chunk = -(-max(-(-max_kv // config.num_splits), 1) // block_n) * block_n
    else:
        chunk = pick_chunk(seg_tiles, num_kv_heads=num_kv_heads, num_programs=num_programs, block_n=block_n)
    classes = [split_keys(t, chunk) for t in seg_tiles]
    work = bind_items(classes, seg, num_out_rows=num_rows)
    return _device_work(work, classes, tiles, num_rows=num_rows, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, dtype=dtype, device=torch.device(device))


def _device_work(work: WorkList, classes: list[Items], tiles: list[TileConfig], *, num_rows: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> StepWork:
    launched = [c for c, items in enumerate(classes) if len(items.seg)]
    segments, kv_indices, num_parts, part_indptr, part_rows, *items = _to_device(device, [
        work.segments, work.kv_indices, work.num_parts, work.part_indptr, work.part_rows,
        *(work.items[c] for c in launched),
    ])
    num_counters = num_rows * num_heads if work.num_partial_rows else 1
    return StepWork(
        num_rows, num_heads, num_kv_heads, head_dim, dtype, tuple(tiles[c] for c in launched), tuple(items),
        segments, kv_indices, num_parts, part_indptr, part_rows,
        torch.zeros(num_counters, dtype=torch.int32, device=device), work.num_partial_rows, work.is_covered,
    )


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert q.dtype in DTYPES, f"q dtype {q.dtype} is not fp16, bf16 or fp32"
    assert k_cache.dtype == v_cache.dtype == q.dtype, "q, k_cache and v_cache must share one dtype"
    assert q.dim() == 3 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape, (
        "q is [N, Hq, D]; k_cache and v_cache are [num_slots, Hkv, D]"
    )
    head_dim, num_kv_heads = q.shape[2], k_cache.shape[1]
    assert head_dim in HEAD_DIMS and k_cache.shape[2] == head_dim, f"head size {head_dim}: not {HEAD_DIMS}"
    assert q.shape[1] % num_kv_heads == 0, f"GQA ratio {q.shape[1]} / {num_kv_heads} is not whole"
    # The kernel assumes a unit stride over D (one vector load per row); other strides are free.
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "D must be contiguous"
    assert q.device == k_cache.device == v_cache.device, "all tensors on one device"


class Launch(NamedTuple):
    """One kernel launch: its grid, arguments by name, constexprs and compile options."""

    grid: tuple[int, int]
    args: dict[str, object]
    constexprs: dict[str, object]
    options: dict[str, int]


def launches(
    step: StepWork, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor, list[Launch]]:
    """The output (o, lse) and the launches that fill it: what `attend` runs and aot.py compiles."""
    check_inputs(q, k_cache, v_cache)
    assert (q.shape[1], k_cache.shape[1], q.shape[2], q.dtype) == (
        step.num_heads, step.num_kv_heads, step.head_dim, step.dtype), "q or the pool differ from the step"
    shape_o, shape_lse = (step.num_rows, step.num_heads, step.head_dim), (step.num_rows, step.num_heads)
    if step.is_covered:
        o, lse = q.new_empty(shape_o, dtype=torch.float32), q.new_empty(shape_lse, dtype=torch.float32)
    else:
        o, lse = q.new_zeros(shape_o, dtype=torch.float32), q.new_full(shape_lse, -math.inf, dtype=torch.float32)
    # At least one row: an empty tensor would hand Triton a null pointer.
    num_partial_rows = max(step.num_partial_rows, 1)
    args = dict(
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, o_ptr=o, lse_ptr=lse,
        part_o_ptr=q.new_empty((num_partial_rows, *shape_o[1:]), dtype=torch.float32),
        part_lse_ptr=q.new_empty((num_partial_rows, step.num_heads), dtype=torch.float32),
        counter_ptr=step.counters, kv_indices_ptr=step.kv_indices, seg_ptr=step.segments,
        num_parts_ptr=step.num_parts, part_indptr_ptr=step.part_indptr, part_rows_ptr=step.part_rows,
        stride_qn=q.stride(0), stride_qh=q.stride(1), stride_kn=k_cache.stride(0), stride_kh=k_cache.stride(1),
        stride_vn=v_cache.stride(0), stride_vh=v_cache.stride(1), qk_scale=sm_scale * _LOG2E,
    )
    block_d = max(16, 1 << (step.head_dim - 1).bit_length())
    return o, lse, [
        Launch(
            (items.shape[0], step.num_kv_heads), {**args, "item_ptr": items},
            dict(GROUP=step.num_heads // step.num_kv_heads, HEAD_DIM=step.head_dim, BLOCK_M=tile.block_m,
                 BLOCK_N=tile.block_n, BLOCK_D=block_d, UPCAST=INTERPRET),
            dict(num_warps=tile.num_warps, num_stages=tile.num_stages),
        )
        for tile, items in zip(step.tiles, step.items, strict=True)
    ]


def attend(
    step: StepWork, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every part of `step` for one layer. q: [N, Hq, D]; k_cache, v_cache: [num_slots, Hkv, D] (one dtype,
    the step's; the last dim contiguous). Returns o: float32 [num_rows, Hq, D] and lse: float32
    [num_rows, Hq] (natural log), the parts merged; a row no part reaches is o = 0, lse = -inf."""
    o, lse, todo = launches(step, q, k_cache, v_cache, sm_scale=sm_scale)
    for launch in todo:
        cascade_kernel[launch.grid](**launch.args, **launch.constexprs, **launch.options)
    return o, lse
