"""Next tokens from logits (greedy, temperature, top-k, top-p, per-request seeds, min_tokens) and the finish
rules (EOS, stop strings, max_tokens), with vLLM's semantics.

A seeded request draws from its own torch.Generator, row by row, so its tokens do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from batchrun.requests import SamplingParams

FinishReason = Literal["stop", "length"]


class Sampler:
    """Per-request sampling parameters as arrays indexed by request id (plan row); `sample` is vectorised."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        *,
        eos_token_ids: Sequence[int],
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.temperature = np.array([p.temperature for p in params], np.float32)
        self.top_p = np.array([p.top_p for p in params], np.float32)
        self.top_k = np.array([p.top_k for p in params], np.int64)
        self.min_tokens = np.array([p.min_tokens for p in params], np.int64)
        self.seed = [p.seed for p in params]
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.int64, device=self.device)
        # Unseeded requests share one run-level stream; seeded ones get theirs on first use.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}

    def release(self, request: int) -> None:
        """The request is finished: drops its generator."""
        self._generators.pop(request, None)

    def sample(self, logits: torch.Tensor, requests: np.ndarray, num_generated: np.ndarray) -> np.ndarray:
        """logits float32 [M, V] (modified in place), requests int64 [M], num_generated (tokens already
        generated) [M] → token ids int64 [M]."""
        if len(self.eos) and (is_early := num_generated < self.min_tokens[requests]).any():
            # EOS is suppressed until min_tokens, as transformers' MinNewTokensLengthLogitsProcessor and vLLM.
            rows = torch.from_numpy(np.flatnonzero(is_early)).to(self.device)
            logits[rows.unsqueeze(1), self.eos.unsqueeze(0)] = -torch.inf
        tokens = torch.empty(len(requests), dtype=torch.int64, device=logits.device)
        is_greedy = self.temperature[requests] == 0.0
        if is_greedy.all():
            return logits.argmax(dim=-1).cpu().numpy()
        greedy_rows = np.flatnonzero(is_greedy)
        if len(greedy_rows):
            g = torch.from_numpy(greedy_rows).to(self.device)
            tokens[g] = logits[g].argmax(dim=-1)
        rows = np.flatnonzero(~is_greedy)
        reqs = requests[rows]
        r = torch.from_numpy(rows).to(self.device)
        temperature = torch.from_numpy(self.temperature[reqs]).to(self.device)
        probs = self._filtered_probs(logits[r] / temperature.unsqueeze(1), reqs)  # [S, V]
        tokens[r] = self._draw(probs, reqs)
        return tokens.cpu().numpy()

    def _filtered_probs(self, logits: torch.Tensor, reqs: np.ndarray) -> torch.Tensor:
        """Softmax after the top-k and top-p cuts (each row its own); rows without cuts skip the sort."""
        top_k, top_p = self.top_k[reqs], self.top_p[reqs]
        num_vocab = logits.shape[1]
        is_cut = ((top_k > 0) & (top_k < num_vocab)) | (top_p < 1.0)
        if not is_cut.any():
            return torch.softmax(logits, dim=-1)
        cut = torch.from_numpy(np.flatnonzero(is_cut)).to(self.device)
        sorted_logits, sorted_idx = logits[cut].sort(dim=-1, descending=True)  # [C, V]
        k = torch.from_numpy(np.where(top_k[is_cut] > 0, top_k[is_cut], num_vocab)).to(self.device)
        rank = torch.arange(num_vocab, device=self.device)
        sorted_logits.masked_fill_(rank.unsqueeze(0) >= k.unsqueeze(1), -torch.inf)
        # Keep the smallest head whose probability reaches top_p: drop a token when the ones before it
        # already reach it (the first token always stays).
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        p = torch.from_numpy(top_p[is_cut]).to(self.device)
        sorted_logits.masked_fill_(before >= p.unsqueeze(1), -torch.inf)
        logits[cut] = torch.full_like(sorted_logits, -torch.inf).scatter_(1, sorted_idx, sorted_logits)
        return torch.softmax(logits, dim=-1)

    def _draw(self, probs: torch.Tensor, reqs: np.ndarray) -> torch.Tensor:
        """argmax(probs / Exp(1) noise): a categorical draw without a device sync (gpt-fast's
        multinomial_sample_one_no_sync). Seeded rows draw their noise from their own generator."""
        noise = torch.empty_like(probs)
        is_seeded = np.array([self.seed[r] is not None for r in reqs.tolist()], bool)
        unseeded = np.flatnonzero(~is_seeded)
        if len(unseeded) == len(reqs):
            noise.exponential_(generator=self.generator)
        elif len(unseeded):
            u = torch.from_numpy(unseeded).to(self.device)
            noise[u] = torch.empty_like(noise[u]).exponential_(generator=self.generator)
        for i in np.flatnonzero(is_seeded).tolist():
            noise[i].exponential_(generator=self._generator(int(reqs[i])))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, request: int) -> torch.Generator:
        g = self._generators.get(request)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(int(self.seed[request]))
            self._generators[request] = g
        return g


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
            # A new stop string ends in the new text, so it starts at most max_stop_len - 1 before it.
            start = max(len(self.text) - self.max_stop_len + 1, 0)
            self._extend_text(token_ids, decode)
            if is_eligible:
                found = [i for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
                if found:
                    self.stop_at = min(found)
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
