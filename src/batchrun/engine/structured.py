"""Structured output in the step loop: an xgrammar matcher per request with a response_format, one token
bitmask per step for all of them (filled by xgrammar's batch matcher in C++, applied on the device), and the
sampled tokens fed back. No per-request Python loop over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from batchrun.grammar import grammar_of
from batchrun.requests import SamplingParams


class StructuredOutput:
    """The grammars of a run's requests (indexed by plan row); inert when no request asks for one."""

    def __init__(self, params: Sequence[SamplingParams], *, tokenizer: Any, vocab_size: int,
                 eos_token_ids: Sequence[int]) -> None:
        self.formats = [p.response_format for p in params]
        self.is_structured = np.array([f is not None for f in self.formats], bool)
        self.vocab_size = vocab_size
        self._matchers: dict[int, Any] = {}
        self._compiled: dict[str, Any] = {}
        if not self.is_structured.any():
            return
        import xgrammar as xgr

        self._xgr = xgr
        # The run's EOS ids end a finished grammar, so a completed JSON value ends with finish_reason "stop".
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(eos_token_ids))
        self._compiler = xgr.GrammarCompiler(info)
        self._batch = xgr.BatchGrammarMatcher()

    def apply(self, logits: torch.Tensor, requests: np.ndarray) -> np.ndarray:
        """Masks what each structured row's grammar forbids in logits [M, V] (in place); returns those rows."""
        rows = np.flatnonzero(self.is_structured[requests])
        if not len(rows):
            return rows
        xgr = self._xgr
        matchers = [self._matcher(r) for r in requests[rows].tolist()]
        bitmask = xgr.allocate_token_bitmask(len(requests), self.vocab_size)  # int32 [M, ceil(V / 32)], on the host
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows.tolist())
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                        indices=rows.tolist())
        return rows

    def accept(self, requests: np.ndarray, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Advances the grammars of `rows` (from `apply`) by their sampled tokens."""
        if len(rows):
            matchers = [self._matchers[r] for r in requests[rows].tolist()]
            is_accepted = self._xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens[rows].tolist())
            assert all(is_accepted), "a token the grammar's mask allowed was refused"

    def release(self, request: int) -> None:
        self._matchers.pop(request, None)

    def _matcher(self, request: int) -> Any:
        matcher = self._matchers.get(request)
        if matcher is None:
            fmt = self.formats[request]
            assert fmt is not None
            compiled = self._compiled.get(fmt)
            if compiled is None:
                compiled = self._compiled[fmt] = self._compiler.compile_grammar(grammar_of(fmt))
            matcher = self._matchers[request] = self._xgr.GrammarMatcher(compiled)
        return matcher
