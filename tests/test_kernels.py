"""Triton cascade kernels (batchrun.kernels) against a float64 reference: attention over [prefix ‖ own] with
the explicit mask. Compiled on CUDA when present, else in Triton's CPU interpreter (tests/conftest.py)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from batchrun.kernels import LaunchConfig, OwnPart, PrefixPart, StepWork, attend, prepare_step  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
NUM_KV_HEADS = 2
# Small tiles, so that small shapes cross tile and block boundaries.
SMALL = LaunchConfig(block_m=16, block_n=16, num_splits=1)

# The edge-case batch: prefix lengths per group, then (group or None, q_len, own_len) per sequence, with the
# members of a group adjacent. BLOCK_N is 16 in SMALL.
PREFIX_LENS = [37, 7, 0, 16]
SEQS = [
    (0, 1, 1),  # decode, own length 1
    (0, 1, 16),  # decode, own length at a block boundary
    (0, 12, 12),  # whole-suffix prefill mixed with decodes: group 0 has 19 tokens, > one 16-row tile
    (0, 5, 20),  # chunked prefill: 15 own keys came before this chunk
    (1, 1, 17),  # group of one, prefix shorter than a block
    (2, 2, 3),  # a segment without keys
    (3, 1, 0),  # own length 0, prefix exactly one block
    (None, 1, 33),  # no prefix
    (None, 3, 3),
]


@dataclass
class Batch:
    """A ragged batch in a shuffled KV pool, with the metadata of every kernel and the reference's inputs."""

    q: torch.Tensor  # [N, Hq, D]
    k_cache: torch.Tensor  # [num_slots, Hkv, D]
    v_cache: torch.Tensor
    sm_scale: float
    prefix: PrefixPart  # every group's prefix (one depth)
    own: OwnPart  # own keys only
    full: OwnPart  # causal over [prefix ‖ own]
    seqs: list[tuple[int, int, torch.Tensor, int]]  # (q_start, q_len, [prefix ‖ own] slots, prefix_len)


def _index(values: list[int]) -> np.ndarray:
    return np.array(values, np.int32)


def make_batch(
    prefix_lens: list[int], seqs: list[tuple[int | None, int, int]], *, group: int, head_dim: int,
    dtype: torch.dtype, seed: int = 0,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(prefix_lens) + sum(own for _, _, own in seqs) + 5
    perm = torch.randperm(num_slots, generator=gen)  # scattered slots exercise the indirection
    taken = 0

    def take(n: int) -> torch.Tensor:
        nonlocal taken
        taken += n
        return perm[taken - n : taken]

    prefix_slots = [take(n) for n in prefix_lens]
    num_rows = sum(q_len for _, q_len, _ in seqs)
    shape = (num_slots, NUM_KV_HEADS, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    q = torch.randn((num_rows, NUM_KV_HEADS * group, head_dim), generator=gen).to(dtype).to(DEVICE)

    q_start = 0
    own_slots, full_slots, out_seqs, seg_rows = [], [], [], {}
    for g, q_len, own_len in seqs:
        mine = take(own_len)
        shared = prefix_slots[g] if g is not None else perm[:0]
        own_slots.append(mine)
        full_slots.append(torch.cat([shared, mine]))
        out_seqs.append((q_start, q_len, full_slots[-1], len(shared)))
        if g is not None:
            seg_rows.setdefault(g, []).extend(range(q_start, q_start + q_len))
        q_start += q_len
    for rows in seg_rows.values():
        assert rows == list(range(rows[0], rows[-1] + 1)), "a group's members must be adjacent"

    def ragged(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        indptr = [0]
        for p in parts:
            indptr.append(indptr[-1] + len(p))
        return _index(torch.cat([perm[:0], *parts]).tolist()), _index(indptr)

    q_indptr = _index([0, *[sum(n for _, n, _ in seqs[: i + 1]) for i in range(len(seqs))]])
    groups = sorted(seg_rows)
    kv_indices, kv_indptr = ragged([prefix_slots[g] for g in groups])
    prefix = PrefixPart(q_start=_index([seg_rows[g][0] for g in groups]),
                        q_len=_index([len(seg_rows[g]) for g in groups]), kv_indices=kv_indices, kv_indptr=kv_indptr)
    own = OwnPart(q_indptr, *ragged(own_slots))
    full = OwnPart(q_indptr, *ragged(full_slots))
    return Batch(q, k_cache, v_cache, head_dim**-0.5, prefix, own, full, out_seqs)


def reference(batch: Batch, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (o [N, Hq, D], lse [N, Hq]) of part "full", "prefix" or "own" of every sequence, in q order.
    Query i of q_len sees every prefix key and own key j iff j <= own_len - q_len + i."""
    q = batch.q.double().cpu()
    k_pool, v_pool = batch.k_cache.double().cpu(), batch.v_cache.double().cpu()
    group = q.shape[1] // k_pool.shape[1]
    o = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    for q_start, q_len, slots, prefix_len in batch.seqs:
        own_len = len(slots) - prefix_len
        key = torch.arange(len(slots))[None, :]
        row = torch.arange(q_len)[:, None]
        is_own_visible = (key >= prefix_len) & (key - prefix_len <= own_len - q_len + row)
        visible = {
            "full": (key < prefix_len) | is_own_visible,
            "prefix": (key < prefix_len).expand(q_len, -1),
            "own": is_own_visible,
        }[part]
        k = k_pool[slots].repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_pool[slots].repeat_interleave(group, dim=1)
        rows = slice(q_start, q_start + q_len)
        s = torch.einsum("nhd,lhd->hnl", q[rows], k) * batch.sm_scale
        s = s.masked_fill(~visible, -math.inf)
        s_lse = s.logsumexp(-1)  # [Hq, q_len]
        p = torch.where(s_lse[..., None].isfinite(), torch.exp(s - s_lse[..., None]), 0.0)
        o[rows] = torch.einsum("hnl,lhd->nhd", p, v)
        lse[rows] = s_lse.T
    return o, lse


def assert_state_close(o: torch.Tensor, lse: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor], tol: float):
    assert o.dtype == lse.dtype == torch.float32
    assert not o.isnan().any() and not lse.isnan().any(), "NaN in the output"
    torch.testing.assert_close(o.cpu().double(), ref[0], atol=tol, rtol=tol)
    # assert_close also requires the -inf (empty) entries to coincide.
    torch.testing.assert_close(lse.cpu().double(), ref[1], atol=tol, rtol=tol)


def prepare(batch: Batch, *, own: OwnPart | None, prefixes: list[PrefixPart], config: LaunchConfig | None = None,
         num_rows: int | None = None) -> StepWork:
    """The step work list of the given parts over the batch's q (all its rows unless num_rows says otherwise)."""
    q = batch.q
    return prepare_step(num_rows=q.shape[0] if num_rows is None else num_rows, own=own, prefixes=prefixes,
                     num_heads=q.shape[1], num_kv_heads=NUM_KV_HEADS, head_dim=q.shape[2], dtype=q.dtype,
                     device=torch.device(DEVICE), config=config)


def run(batch: Batch, *, own: OwnPart | None, prefixes: list[PrefixPart], config: LaunchConfig | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts planned and attended over the batch's q, rows in q order (a row no part reaches is empty)."""
    step = prepare(batch, own=own, prefixes=prefixes, config=config)
    return attend(step, batch.q, batch.k_cache, batch.v_cache, sm_scale=batch.sm_scale)


def cascade(batch: Batch, config: LaunchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Own part and prefix part in one work list, as the engine's steps are."""
    return run(batch, own=batch.own, prefixes=[batch.prefix], config=config)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (GQA ratio, head size): 80 and 96 exercise the masked padding of D to 128.
SHAPES = [(1, 64), (4, 80), (8, 96), (2, 128)]


@pytest.mark.parametrize("group,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cascade_matches_reference(dtype: torch.dtype, group: int, head_dim: int) -> None:
    batch = make_batch(PREFIX_LENS, SEQS, group=group, head_dim=head_dim, dtype=dtype, seed=group)
    tol = TOL[dtype]

    o_pre, lse_pre = run(batch, own=None, prefixes=[batch.prefix], config=SMALL)
    assert_state_close(o_pre, lse_pre, reference(batch, "prefix"), tol)
    o_own, lse_own = run(batch, own=batch.own, prefixes=[], config=SMALL)
    assert_state_close(o_own, lse_own, reference(batch, "own"), tol)

    o_own, lse_own = cascade(batch, SMALL)
    assert_state_close(o_own, lse_own, reference(batch, "full"), tol)
    # The cascade equals one causal pass over the concatenated KV (prefix prefill works this way).
    o_full, lse_full = run(batch, own=batch.full, prefixes=[], config=SMALL)
    assert_state_close(o_own, lse_own, (o_full.cpu().double(), lse_full.cpu().double()), tol)


@pytest.mark.parametrize(
    "dtype,num_splits", [(torch.float32, 2), (torch.float32, 8), (torch.float16, 3), (torch.bfloat16, 8)], ids=str
)
def test_split_count_does_not_change_result(dtype: torch.dtype, num_splits: int) -> None:
    # 8 splits of the 37-key prefix (3 blocks) leave splits with no key; in chunked prefill some rows see no
    # key of a split, which is where an unguarded running max turns into NaN.
    batch = make_batch(PREFIX_LENS, SEQS, group=4, head_dim=64, dtype=dtype, seed=7)
    split = LaunchConfig(block_m=16, block_n=16, num_splits=num_splits)
    o, lse = cascade(batch, split)
    assert_state_close(o, lse, reference(batch, "full"), TOL[dtype])
    o_one, lse_one = cascade(batch, SMALL)
    assert_state_close(o, lse, (o_one.cpu().double(), lse_one.cpu().double()), TOL[dtype])
    o_full, lse_full = run(batch, own=batch.full, prefixes=[], config=split)
    assert_state_close(o_full, lse_full, reference(batch, "full"), TOL[dtype])


def test_public_functions_with_default_tiles() -> None:
    batch = make_batch(PREFIX_LENS, SEQS, group=4, head_dim=128, dtype=torch.float16, seed=3)
    o, lse = run(batch, own=batch.own, prefixes=[batch.prefix])
    assert_state_close(o, lse, reference(batch, "full"), TOL[torch.float16])


def test_int64_metadata_and_rows_outside_every_sequence() -> None:
    # Row 0 and the last row belong to no sequence: they must come out empty, with or without splits.
    batch = make_batch([], [(None, 1, 0), (None, 2, 40), (None, 1, 5), (None, 1, 0)], group=2, head_dim=64,
                       dtype=torch.float32)
    q_indptr, kv_indices, kv_indptr = (a.astype(np.int64) for a in batch.own)
    own = OwnPart(q_indptr[1:-1], kv_indices, kv_indptr[1:-1])
    ref_o, ref_lse = reference(batch, "own")
    for num_splits in (1, 3):
        config = LaunchConfig(block_m=16, block_n=16, num_splits=num_splits)
        o, lse = run(batch, own=own, prefixes=[], config=config)
        assert_state_close(o, lse, (ref_o, ref_lse), TOL[torch.float32])
        assert (o[[0, -1]] == 0).all() and (lse[[0, -1]] == -math.inf).all()


def test_launcher_rejects_bad_inputs() -> None:
    batch = make_batch([16], [(0, 1, 1)], group=1, head_dim=64, dtype=torch.float16)
    common = dict(k_cache=batch.k_cache, v_cache=batch.v_cache, sm_scale=batch.sm_scale)
    with pytest.raises(AssertionError, match=">= 16"):
        run(batch, own=None, prefixes=[batch.prefix], config=LaunchConfig(block_m=16, block_n=8))
    step = prepare(batch, own=None, prefixes=[batch.prefix])
    with pytest.raises(AssertionError, match="one dtype"):
        attend(step, batch.q.float(), **common)
    with pytest.raises(AssertionError, match="D must be contiguous"):
        attend(step, batch.q.transpose(1, 2).contiguous().transpose(1, 2), **common)
    with pytest.raises(AssertionError, match="head size"):
        sliced = replace(batch, q=batch.q[..., :48], k_cache=batch.k_cache[..., :48], v_cache=batch.v_cache[..., :48])
        run(sliced, own=batch.own, prefixes=[])


def test_empty_batches() -> None:
    batch = make_batch([4], [(0, 1, 1)], group=4, head_dim=64, dtype=torch.float32)
    common = dict(k_cache=batch.k_cache, v_cache=batch.v_cache, sm_scale=batch.sm_scale)
    none = _index([])
    no_segment = PrefixPart(q_start=none, q_len=none, kv_indices=none, kv_indptr=_index([0]))
    o, lse = attend(prepare(batch, own=None, prefixes=[no_segment], num_rows=0), batch.q[:0], **common)
    assert o.shape == (0, 8, 64) and lse.shape == (0, 8)
    no_row = OwnPart(q_indptr=_index([0]), kv_indices=none, kv_indptr=_index([0]))
    o, lse = attend(prepare(batch, own=no_row, prefixes=[], num_rows=0), batch.q[:0], **common)
    assert o.shape == (0, 8, 64) and lse.shape == (0, 8)


@pytest.mark.parametrize("group", [3, 5, 6, 7])
def test_any_gqa_ratio(group: int) -> None:
    batch = make_batch(PREFIX_LENS, SEQS, group=group, head_dim=64, dtype=torch.float32, seed=group)
    for config in (LaunchConfig(block_m=16, block_n=16, num_splits=1), LaunchConfig(block_n=16, num_splits=3)):
        o, lse = cascade(batch, config)
        assert_state_close(o, lse, reference(batch, "full"), TOL[torch.float32])


# A step as the engine plans it: two prefix depths (each group's prefix cut in two), sequences whose query is
# longer than their own keys (the first rows see no own key), a decode group of 9 on a 300-key prefix, and a
# 40-token prefill that takes the large tiles while the decodes take the small ones.
STEP_PREFIX_LENS = [37, 7, 0, 300]
STEP_SEQS = [*SEQS[:5], (1, 5, 3), *SEQS[5:7], *[(3, 1, n) for n in range(1, 9)], (None, 40, 40), (None, 4, 2)]


def prefix_depths(batch: Batch) -> list[PrefixPart]:
    """The prefix part as two depths: every segment's first keys, then the rest."""
    meta = batch.prefix._asdict()
    kv_len = np.diff(meta["kv_indptr"])
    cut = kv_len // 3
    depths = []
    for lo, hi in ((np.zeros_like(cut), cut), (cut, kv_len)):
        kv_indices = np.concatenate([meta["kv_indices"][s + a : s + b]
                                     for s, a, b in zip(meta["kv_indptr"][:-1], lo, hi, strict=True)] or [[]])
        depths.append(PrefixPart(meta["q_start"], meta["q_len"], kv_indices.astype(np.int64),
                                 np.concatenate([[0], np.cumsum(hi - lo)])))
    return depths


@pytest.mark.parametrize("dtype,group", [(torch.float32, 7), (torch.float16, 3), (torch.bfloat16, 4)], ids=str)
@pytest.mark.parametrize("num_splits", [None, 4])
def test_prepare_step_runs_every_part_in_one_work_list(dtype: torch.dtype, group: int, num_splits: int | None) -> None:
    batch = make_batch(STEP_PREFIX_LENS, STEP_SEQS, group=group, head_dim=128, dtype=dtype, seed=11)
    step = prepare(batch, own=batch.own, prefixes=prefix_depths(batch),
                config=LaunchConfig(block_n=16, num_splits=num_splits))
    assert len(step.items) == 2, "the decodes and the prefill take different tiles"
    assert all(i.dtype == torch.int32 for i in (*step.items, step.segments, step.kv_indices, step.part_rows))
    for _ in range(2):  # the second layer finds the merge counters re-armed
        o, lse = attend(step, batch.q, batch.k_cache, batch.v_cache, sm_scale=batch.sm_scale)
        assert_state_close(o, lse, reference(batch, "full"), TOL[dtype])
    assert (step.counters == 0).all()
