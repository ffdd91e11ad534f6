"""One step's flat batch and its cascade-attention metadata, built on the host (numpy) once per step.

Rows: the decode tokens in plan order (so every shared node's readers are adjacent and its KV is read once
per step), then the prefill chunks in queue order. Every layer reuses this metadata (FlashInfer's "plan").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from batchrun.attention.base import CascadeInput, OwnPart, PrefixPart
from batchrun.engine.scheduler import Step
from batchrun.forest import PrefixForest, at_node
from batchrun.tokens import TokenTable


class StepBatch(NamedTuple):
    input_ids: np.ndarray  # int64 [N]
    positions: np.ndarray  # int64 [N]
    slots: np.ndarray  # int64 [N]: where each row's k and v are written
    # The own part has one sequence per item (decode request or chunk) over its own KV up to and including its
    # rows; one prefix part per depth that has readers in this step.
    attention: CascadeInput
    logit_rows: np.ndarray  # int64 [M]: rows whose next token is sampled
    logit_requests: np.ndarray  # int64 [M]: their requests
    num_decode: int
    num_prefill: int


class BatchBuilder:
    """Static per-plan arrays: the prefix forest (chains, segment starts) and where each node's tokens are read."""

    def __init__(self, *, tokens: TokenTable, forest: PrefixForest, node_request: np.ndarray, gqa_ratio: int) -> None:
        self.gqa_ratio = gqa_ratio
        self.tokens = tokens.tokens
        self.token_start = tokens.indptr[:-1]
        self.forest = forest
        # Where a node's tokens are read from: the token row of one of its members.
        self.node_token_start = self.token_start[np.asarray(node_request, np.int64)]  # [N]

    def build(
        self,
        step: Step,
        *,
        prompt_len: np.ndarray,
        num_generated: np.ndarray,
        last_token: np.ndarray,
        request_slots: list[np.ndarray | None],
        node_slots: list[np.ndarray | None],
    ) -> StepBatch:
        decode, chunks = step.decode, step.chunks
        num_decode = len(decode)
        # Items: decode requests, then chunks. Per item: rows, own KV, where its tokens sit in its slots.
        chunk_start = np.array([c.start for c in chunks], np.int64)
        chunk_end = np.array([c.end for c in chunks], np.int64)
        chunk_is_node = np.array([c.is_node for c in chunks], bool)
        chunk_index = np.array([c.index for c in chunks], np.int64)
        node_of = np.where(chunk_is_node, chunk_index, -1)
        request_of = np.where(chunk_is_node, -1, chunk_index)
        # request_of and node_of are -1 where the chunk is of the other kind: np.where drops what they read.
        forest = self.forest
        chunk_own_start = np.where(chunk_is_node, at_node(forest.node_start, node_of), forest.own_start[request_of])

        decode_pos = prompt_len[decode] + num_generated[decode] - 1  # the last sampled token's position
        item_q_len = np.concatenate([np.ones(num_decode, np.int64), chunk_end - chunk_start])
        item_kv_len = np.concatenate([decode_pos - forest.own_start[decode] + 1, chunk_end - chunk_own_start])
        q_indptr = _indptr(item_q_len)
        kv_indptr = _indptr(item_kv_len)
        own_slots = [request_slots[r] for r in decode.tolist()]
        own_slots += [node_slots[c.index] if c.is_node else request_slots[c.index] for c in chunks]
        kv_indices = _concat([s[:n] for s, n in zip(own_slots, item_kv_len.tolist(), strict=True)])

        # An item's rows are the last q_len keys of its own KV: they write their k, v there.
        num_rows = int(q_indptr[-1])
        row_item = np.repeat(np.arange(len(item_q_len)), item_q_len)
        slots = kv_indices[kv_indptr[row_item + 1] - (q_indptr[row_item + 1] - np.arange(num_rows))]

        spans = list(zip(chunk_start.tolist(), chunk_end.tolist(), strict=True))
        token_row_start = np.where(chunk_is_node, at_node(self.node_token_start, node_of), self.token_start[request_of])
        chunk_ids = [self.tokens[t + a : t + b] for t, (a, b) in zip(token_row_start.tolist(), spans, strict=True)]
        input_ids = _concat([last_token[decode], *chunk_ids])
        positions = _concat([decode_pos, *(np.arange(a, b) for a, b in spans)])

        # A node's own prefill reads its ancestors only.
        item_chain = np.concatenate([
            forest.request_chains(decode),
            np.where(chunk_is_node[:, None], forest.node_chains(at_node(forest.node_parent, node_of, fill=-1)),
                     forest.request_chains(request_of)),
        ])
        prefixes = tuple(
            p for d in range(forest.num_levels) if (p := _prefix_part(item_chain[:, d], q_indptr, node_slots))
        )

        is_first_token = ~chunk_is_node & np.array([c.is_last for c in chunks], bool)
        logit_rows = np.concatenate([np.arange(num_decode), q_indptr[num_decode + 1 :][is_first_token] - 1])
        logit_requests = np.concatenate([decode, chunk_index[is_first_token]])
        return StepBatch(
            input_ids=input_ids,
            positions=positions,
            slots=slots,
            attention=CascadeInput(
                num_rows=num_rows,
                own=OwnPart(q_indptr, kv_indices, kv_indptr),
                prefixes=prefixes,
                gqa_ratio=self.gqa_ratio,
            ),
            logit_rows=logit_rows.astype(np.int64),
            logit_requests=logit_requests.astype(np.int64),
            num_decode=num_decode,
            num_prefill=num_rows - num_decode,
        )


def _prefix_part(
    item_node: np.ndarray, q_indptr: np.ndarray, node_slots: list[np.ndarray | None]
) -> PrefixPart | None:
    """Segments are runs of adjacent items reading the same node at this depth."""
    if len(item_node) == 0:
        return None
    run_first = np.flatnonzero(np.r_[True, item_node[1:] != item_node[:-1]])
    run_end = np.r_[run_first[1:], len(item_node)]
    run_node = item_node[run_first]
    keep = run_node >= 0
    if not keep.any():
        return None
    run_first, run_end, run_node = run_first[keep], run_end[keep], run_node[keep]
    q_start = q_indptr[run_first]
    q_len = q_indptr[run_end] - q_start
    kv = [node_slots[n] for n in run_node.tolist()]
    kv_indptr = _indptr(np.array([len(k) for k in kv], np.int64))
    return PrefixPart(q_start, q_len, _concat(kv), kv_indptr)


def _indptr(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64)
