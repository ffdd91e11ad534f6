"""The finish rules, with vLLM's semantics: a request ends on EOS (after min_tokens), a stop string or
max_tokens, and fails on NaN logits. `FinishRules` applies them to a step's sampled tokens (vectorised; only
finishing rows and rows with stop strings reach Python); `StopChecker` follows one request's text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from batchrun.output import FinishReason
from batchrun.requests import SamplingParams


class Finished(NamedTuple):
    request: int
    reason: FinishReason


class StepFinishes(NamedTuple):
    """A step's outcome, in the order the results are written: the failures, then the completions."""

    nan_requests: list[int]  # their logits had a NaN: they fail
    finished: list[Finished]  # stop-string rows first, then EOS and length rows, each in row order


class FinishRules:
    """The rules for every request of a run (indexed by plan row); `decode` turns token ids into text."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        *,
        eos_token_ids: Sequence[int],
        decode: Callable[[list[int]], str],
    ) -> None:
        eos = frozenset(eos_token_ids)
        self.eos = np.array(sorted(eos), np.int64)
        self.min_tokens = np.array([p.min_tokens for p in params], np.int64)
        self.max_tokens = np.array([p.max_tokens for p in params], np.int64)
        self.has_stop = np.array([bool(p.stop) for p in params], bool)
        self.stop_checkers = {r: StopChecker(p, eos_token_ids=eos) for r, p in enumerate(params) if p.stop}
        self.decode = decode

    def check(
        self,
        requests: np.ndarray,
        tokens: np.ndarray,
        *,
        num_generated: np.ndarray,
        output_ids: list[list[int]],
        is_nan: np.ndarray,
    ) -> StepFinishes:
        """After `tokens` [M] were appended for `requests` [M]: which fail and which finish, and why.
        `num_generated` [M] counts the tokens now generated; `output_ids` is indexed by request."""
        is_eos = np.isin(tokens, self.eos) & (num_generated >= self.min_tokens[requests])
        is_length = num_generated >= self.max_tokens[requests]
        nan_requests = requests[is_nan].tolist()
        has_stop = self.has_stop[requests] & ~is_nan
        finished = []
        for r in requests[has_stop].tolist():
            reason = self.stop_checkers[r].check(output_ids[r], self.decode)
            if reason is not None:
                finished.append(Finished(r, reason))
        for i in np.flatnonzero((is_eos | is_length) & ~has_stop & ~is_nan).tolist():
            finished.append(Finished(int(requests[i]), "stop" if is_eos[i] else "length"))
        return StepFinishes(nan_requests, finished)

    def text(self, request: int, token_ids: list[int]) -> str:
        """The completion's text: the output decoded, cut before a stop string if one was found."""
        text = self.decode(token_ids)
        checker = self.stop_checkers.get(request)
        return text if checker is None else checker.final_text(text)


class StopChecker:
    """The finish rules for one request's output so far, in vLLM's order: EOS, stop strings, max_tokens.

    The output text is decoded incrementally, as vLLM does: each check decodes only the tokens since the last
    stable point, so a long output costs linear, not quadratic, decoding. Stop strings are searched only in
    the part a new token can have completed; the output text is cut before the earliest stop string.
    """

    def __init__(self, params: SamplingParams, *, eos_token_ids: frozenset[int]) -> None:
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        self.text = ""  # the output decoded so far
        self._prefix_offset = 0  # tokens from here are decoded again, to see how the next ones join them
        self._read_offset = 0  # tokens before here are in self.text
        self.stop_at: int | None = None  # where the text is cut, once a stop string is found

    def check(self, token_ids: list[int], decode: Callable[[list[int]], str]) -> FinishReason | None:
        """After a token was appended to `token_ids`: why the request finishes now, or None."""
        num = len(token_ids)
        is_eligible = num >= self.params.min_tokens  # before min_tokens nothing stops it (as vLLM)
        if is_eligible and token_ids[-1] in self.eos_token_ids:
            return "stop"
        if self.max_stop_len:
            old_len = len(self.text)
            self._extend_text(token_ids, decode)
            # As vLLM: stop strings count from the token after min_tokens on, only one that ends in the new text
            # (it starts at most len(s) - 1 before), so none completed earlier is found late; of several, the
            # one that completes first, then the first listed.
            if num > self.params.min_tokens:
                found = [(i + len(s), k, i) for k, s in enumerate(self.params.stop)
                         if (i := self.text.find(s, max(old_len - len(s) + 1, 0))) >= 0]
                if found:
                    self.stop_at = min(found)[2]
                    return "stop"
        if num >= self.params.max_tokens:
            return "length"
        return None

    def _extend_text(self, token_ids: list[int], decode: Callable[[list[int]], str]) -> None:
        # A token's text can depend on its neighbours (a character split over byte tokens, a leading space a
        # tokenizer drops at the start of a decode), so the window from the last stable point is decoded and
        # only what the new tokens add is kept; an unfinished character waits for the next token.
        prefix_text = decode(token_ids[self._prefix_offset : self._read_offset])
        new_text = decode(token_ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)

    def final_text(self, text: str) -> str:
        """The completion's text: `text` (the whole output decoded), or the checked text cut at a stop string."""
        return text if self.stop_at is None else self.text[: self.stop_at]
