"""Logits processors applied before the sampler, with vLLM's semantics and order: logit_bias, then the
repetition penalty (over prompt and output tokens), frequency and presence penalties (over output tokens), then
min_p (relative to the most likely token after temperature).

Vectorised over a step's rows: per-request parameters are numpy arrays indexed by plan row, token counts are
built with one scatter per step, and no Python loop runs over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from batchrun.requests import SamplingParams
from batchrun.tokens import TokenTable


class LogitsProcessors:
    """The processors of every request of a run (indexed by plan row); `apply` runs them on a step's logits."""

    def __init__(self, params: Sequence[SamplingParams], *, prompts: TokenTable, device: torch.device) -> None:
        self.prompts, self.device = prompts, device
        self.temperature = np.array([p.temperature for p in params], np.float32)
        self.min_p = np.array([p.min_p for p in params], np.float32)
        self.presence = np.array([p.presence_penalty for p in params], np.float32)
        self.frequency = np.array([p.frequency_penalty for p in params], np.float32)
        self.repetition = np.array([p.repetition_penalty for p in params], np.float32)
        self.has_penalty = np.array([p.has_penalties for p in params], bool)
        # logit_bias of request r: bias_token/bias_value[bias_indptr[r]:bias_indptr[r+1]].
        self.bias_indptr = np.zeros(len(params) + 1, np.int64)
        np.cumsum([len(p.logit_bias) for p in params], out=self.bias_indptr[1:])
        self.bias_token = np.array([t for p in params for t, _ in p.logit_bias], np.int64)
        self.bias_value = np.array([b for p in params for _, b in p.logit_bias], np.float32)
        has_bias = np.diff(self.bias_indptr) > 0
        self.is_active = self.has_penalty | has_bias | ((self.min_p > 0) & (self.temperature > 0))
        self._prompt_cache: dict[int, np.ndarray] = {}

    def apply(self, logits: torch.Tensor, requests: np.ndarray, *, output_ids: Sequence[list[int]]) -> None:
        """logits float32 [M, V], modified in place; requests int64 [M] (plan rows); output_ids: the tokens
        each request has generated so far (indexed by plan row)."""
        if not self.is_active[requests].any():
            return
        self._bias(logits, requests)
        rows = np.flatnonzero(self.has_penalty[requests])
        if len(rows):
            self._penalties(logits, rows, requests[rows], output_ids)
        self._min_p(logits, requests)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def _bias(self, logits: torch.Tensor, requests: np.ndarray) -> None:
        start, end = self.bias_indptr[requests], self.bias_indptr[requests + 1]
        lens = end - start
        if not lens.any():
            return
        rows = np.repeat(np.arange(len(requests)), lens)
        flat = np.repeat(start - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())  # each row's own slice
        index = (self._tensor(rows), self._tensor(self.bias_token[flat]))
        logits.index_put_(index, self._tensor(self.bias_value[flat]), accumulate=True)

    def _penalties(self, logits: torch.Tensor, rows: np.ndarray, reqs: np.ndarray,
                   output_ids: Sequence[list[int]]) -> None:
        num_vocab = logits.shape[1]
        counts = _token_counts([output_ids[r] for r in reqs.tolist()], num_vocab, self.device)  # [P, V]
        # Only the repetition penalty reads the prompt: its distinct tokens, found once per request.
        is_prompt = _token_counts([self._prompt_ids(r) if self.repetition[r] != 1.0 else () for r in reqs.tolist()],
                                  num_vocab, self.device) > 0
        r = self._tensor(rows)
        x = logits[r]
        # Repetition (transformers' and vLLM's): a seen token's logit is divided by the penalty when positive,
        # multiplied when negative.
        penalty = self._tensor(self.repetition[reqs]).unsqueeze(1)
        is_seen = is_prompt | (counts > 0)
        x = torch.where(is_seen, torch.where(x > 0, x / penalty, x * penalty), x)
        # OpenAI's frequency and presence penalties, over the output tokens.
        x -= self._tensor(self.frequency[reqs]).unsqueeze(1) * counts
        x -= self._tensor(self.presence[reqs]).unsqueeze(1) * (counts > 0).float()
        logits[r] = x

    def _prompt_ids(self, request: int) -> np.ndarray:
        ids = self._prompt_cache.get(request)
        if ids is None:
            start, end = self.prompts.indptr[request], self.prompts.indptr[request + 1]
            ids = self._prompt_cache[request] = np.unique(self.prompts.tokens[start:end])
        return ids

    def release(self, request: int) -> None:
        """The request is finished: drops its cached prompt tokens."""
        self._prompt_cache.pop(request, None)

    def _min_p(self, logits: torch.Tensor, requests: np.ndarray) -> None:
        min_p, temperature = self.min_p[requests], self.temperature[requests]
        rows = np.flatnonzero((min_p > 0) & (temperature > 0))
        if not len(rows):
            return
        # p_i >= min_p * p_max after temperature T  <=>  l_i >= l_max + T * ln(min_p): the cut in logit space.
        r = self._tensor(rows)
        x = logits[r]
        floor = x.max(dim=1, keepdim=True).values + self._tensor(temperature[rows] * np.log(min_p[rows])).unsqueeze(1)
        logits[r] = x.masked_fill(x < floor, -torch.inf)


def _token_counts(ids: Sequence[Sequence[int] | np.ndarray], num_vocab: int, device: torch.device) -> torch.Tensor:
    """float32 [len(ids), num_vocab]: how often each token occurs in each row's ids (one scatter)."""
    lens = np.array([len(x) for x in ids], np.int64)
    counts = torch.zeros(len(ids), num_vocab, dtype=torch.float32, device=device)
    if lens.sum():
        flat = np.concatenate([np.asarray(x, np.int64) for x in ids])
        rows = np.repeat(np.arange(len(ids)), lens)
        index = (torch.from_numpy(rows).to(device), torch.from_numpy(flat).to(device))
        counts.index_put_(index, torch.ones(len(flat), device=device), accumulate=True)
    return counts
