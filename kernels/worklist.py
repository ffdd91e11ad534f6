"""The host-side work list of one step (what FlashInfer calls the plan; numpy only): every attention part becomes
segments, each segment (query tile x key chunk) items, and every output row learns how many items write it and
where their partial states lie, so the kernel launches no empty program and merges the partials itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Fields of one item / one segment in the packed int32 tables the kernel reads (rows of 8 for alignment).
ITEM_FIELDS = SEG_FIELDS = 8
# A key chunk is at least this long, so the partial states stay small next to the keys they summarise.
MIN_CHUNK_KEYS = 256


class Part(NamedTuple):
    """One attention part as host arrays: segment g's query rows q_start[g] + [0, q_len[g]) see the keys
    kv_indices[kv_indptr[g] : kv_indptr[g + 1]] (causally: token i of q_len sees key j iff
    j <= kv_len - q_len + i) and write output rows out_start[g] + [0, q_len[g])."""

    q_start: np.ndarray
    q_len: np.ndarray
    out_start: np.ndarray
    kv_indices: np.ndarray
    kv_indptr: np.ndarray
    is_causal: bool


class Segments(NamedTuple):
    """All parts' segments, keys concatenated. diag: token i sees key j iff j <= diag + i."""

    table: np.ndarray  # int32 [S, SEG_FIELDS]: q_start, out_start, kv_start, diag
    q_len: np.ndarray  # int64 [S]
    kv_len: np.ndarray  # int64 [S]
    kv_indices: np.ndarray  # int32 [total keys]


class Items(NamedTuple):
    """Per item: segment, first token, tokens, key range [kv_lo, kv_hi) within the segment."""

    seg: np.ndarray
    tok0: np.ndarray
    num_tok: np.ndarray
    kv_lo: np.ndarray
    kv_hi: np.ndarray


class WorkList(NamedTuple):
    """One step's work, ready to copy to the device (all int32)."""

    segments: np.ndarray  # [S, SEG_FIELDS]
    kv_indices: np.ndarray
    items: list[np.ndarray]  # per tile class: [I, ITEM_FIELDS] (seg, tok0, num_tok, kv_lo, kv_hi, part0)
    num_parts: np.ndarray  # [num_out_rows]: items that write each output row (1: written directly)
    part_indptr: np.ndarray  # [num_out_rows + 1] into part_rows: a merged row's partial-state rows
    part_rows: np.ndarray
    num_partial_rows: int
    is_covered: bool  # every output row is written (else they start as the empty state)


def make_segments(parts: Sequence[Part]) -> Segments:
    tables, q_lens, kv_lens, indices = [], [], [], []
    kv_base = 0
    for p in parts:
        q_len = np.asarray(p.q_len, np.int64)
        kv_indptr = np.asarray(p.kv_indptr, np.int64)
        kv_len = np.diff(kv_indptr)
        assert len(q_len) == len(p.q_start) == len(p.out_start) == len(kv_len), "one entry per segment"
        assert (q_len >= 0).all() and (kv_len >= 0).all(), "q_len and kv_indptr must be non-decreasing"
        assert len(kv_len) == 0 or kv_indptr[-1] <= len(p.kv_indices), "kv_indptr points past kv_indices"
        # Non-causal: diag = kv_len lets every token see every key.
        diag = kv_len - q_len if p.is_causal else kv_len
        table = np.zeros((len(q_len), SEG_FIELDS), np.int64)
        table[:, :4] = np.stack([p.q_start, p.out_start, kv_base + kv_indptr[:-1], diag], axis=1)
        tables.append(table)
        q_lens.append(q_len)
        kv_lens.append(kv_len)
        indices.append(np.asarray(p.kv_indices, np.int64))
        kv_base += len(indices[-1])
    cat = np.concatenate
    assert kv_base < 2**31 and all(i.max(initial=0) < 2**31 for i in indices), "slots and keys are int32"
    return Segments(cat(tables).astype(np.int32), cat(q_lens), cat(kv_lens), cat(indices).astype(np.int32))


def make_tiles(seg_ids: np.ndarray, q_len: np.ndarray, kv_len: np.ndarray, diag: np.ndarray,
               tokens_per_tile: int) -> Items:
    """The query tiles of the given segments (whole tokens, so a token's heads share one tile), each with the
    keys its last token may see; tiles that see no key are left out."""
    num_tiles = -(-q_len[seg_ids] // tokens_per_tile)
    seg = np.repeat(seg_ids, num_tiles)
    first = np.repeat(np.cumsum(num_tiles) - num_tiles, num_tiles)
    tok0 = (np.arange(len(seg)) - first) * tokens_per_tile
    num_tok = np.minimum(tokens_per_tile, q_len[seg] - tok0)
    kv_hi = np.clip(diag[seg] + tok0 + num_tok, 0, kv_len[seg])
    keep = kv_hi > 0
    return Items(seg[keep], tok0[keep], num_tok[keep], np.zeros(keep.sum(), np.int64), kv_hi[keep])


def split_keys(tiles: Items, chunk: int) -> Items:
    """Each tile's key range cut into chunks of `chunk` keys (the split-KV items)."""
    num_chunks = -(-tiles.kv_hi // chunk)
    first = np.repeat(np.cumsum(num_chunks) - num_chunks, num_chunks)
    kv_lo = (np.arange(int(num_chunks.sum())) - first) * chunk
    rep = [np.repeat(a, num_chunks) for a in tiles]
    return Items(rep[0], rep[1], rep[2], kv_lo, np.minimum(rep[4], kv_lo + chunk))


def pick_chunk(tiles: Sequence[Items], *, num_kv_heads: int, num_programs: int, block_n: int) -> int:
    """Keys per item such that the work (keys x KV heads) spreads over about `num_programs` programs: long
    prefixes are split while the many short decode items are left whole."""
    kv_hi = np.concatenate([t.kv_hi for t in tiles])
    if len(kv_hi) == 0:
        return block_n
    fair = -(-int(kv_hi.sum()) * num_kv_heads // num_programs)
    chunk = max(MIN_CHUNK_KEYS, fair, -(-int(kv_hi.max()) // 64))  # and at most 64 chunks a tile
    return -(-chunk // block_n) * block_n


def bind_items(classes: Sequence[Items], segments: Segments, *, num_out_rows: int) -> WorkList:
    """Counts each output row's items; rows written by several get one partial-state row per item."""
    out_start = segments.table[:, 1].astype(np.int64)
    rows_per_class, tables = [], []
    for items in classes:
        first = np.repeat(np.cumsum(items.num_tok) - items.num_tok, items.num_tok)
        t = np.arange(int(items.num_tok.sum())) - first
        item_of = np.repeat(np.arange(len(items.seg)), items.num_tok)
        rows_per_class.append((item_of, t, out_start[items.seg[item_of]] + items.tok0[item_of] + t))
    all_rows = np.concatenate([r for _, _, r in rows_per_class])
    assert len(all_rows) == 0 or (all_rows.min() >= 0 and all_rows.max() < num_out_rows), "rows outside output"
    num_parts = np.bincount(all_rows, minlength=num_out_rows)
    part_base, merged_rows, merged_parts = 0, [], []
    for items, (item_of, t, rows) in zip(classes, rows_per_class, strict=True):
        is_merged_item = np.zeros(len(items.seg), bool)
        np.logical_or.at(is_merged_item, item_of, num_parts[rows] > 1)
        part0 = np.where(is_merged_item, part_base + np.cumsum(items.num_tok * is_merged_item)
                         - items.num_tok * is_merged_item, -1)
        part_base += int((items.num_tok * is_merged_item).sum())
        is_merged = num_parts[rows] > 1
        merged_rows.append(rows[is_merged])
        merged_parts.append((part0[item_of] + t)[is_merged])
        table = np.zeros((len(items.seg), ITEM_FIELDS), np.int64)
        table[:, :6] = np.stack([items.seg, items.tok0, items.num_tok, items.kv_lo, items.kv_hi, part0], axis=1)
        tables.append(table.astype(np.int32))
    merged_rows, merged_parts = np.concatenate(merged_rows), np.concatenate(merged_parts)
    order = np.argsort(merged_rows, kind="stable")
    part_indptr = np.zeros(num_out_rows + 1, np.int64)
    np.cumsum(np.bincount(merged_rows, minlength=num_out_rows), out=part_indptr[1:])
    return WorkList(
        segments.table, segments.kv_indices, tables, num_parts.astype(np.int32), part_indptr.astype(np.int32),
        merged_parts[order].astype(np.int32), part_base, bool((num_parts > 0).all()),
    )
