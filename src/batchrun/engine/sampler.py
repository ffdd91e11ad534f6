"""Next tokens from logits (greedy, temperature, top-k, top-p, per-request seeds, min_tokens), with vLLM's
semantics (the finish rules are in finish.py).

A seeded request draws from its own torch.Generator, row by row, so its tokens do not depend on the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from batchrun.engine.transfer import upload
from batchrun.requests import SamplingParams


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
        self.is_seeded = np.array([p.seed is not None for p in params], bool)  # so a step needs no Python loop
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.int64, device=self.device)
        # Unseeded requests share one run-level stream; seeded ones get theirs on first use.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}

    def release(self, request: int) -> None:
        """The request is finished: drops its generator."""
        self._generators.pop(request, None)

    def sample(self, logits: torch.Tensor, requests: np.ndarray, num_generated: np.ndarray) -> torch.Tensor:
        """logits float32 [M, V] (modified in place), requests int64 [M], num_generated (tokens already
        generated) [M] → token ids int64 [M] on the logits' device (the caller copies them back: no sync here)."""
        if len(self.eos) and (is_early := num_generated < self.min_tokens[requests]).any():
            # EOS is suppressed until min_tokens, as transformers' MinNewTokensLengthLogitsProcessor and vLLM.
            rows = upload([np.flatnonzero(is_early)], self.device)[0]
            logits[rows.unsqueeze(1), self.eos.unsqueeze(0)] = -torch.inf
        tokens = torch.empty(len(requests), dtype=torch.int64, device=logits.device)
        is_greedy = self.temperature[requests] == 0.0
        if is_greedy.all():
            return logits.argmax(dim=-1)
        greedy_rows = np.flatnonzero(is_greedy)
        if len(greedy_rows):
            g = upload([greedy_rows], self.device)[0]
            tokens[g] = logits[g].argmax(dim=-1)
        rows = np.flatnonzero(~is_greedy)
        reqs = requests[rows]
        r = upload([rows], self.device)[0]
        temperature = upload([self.temperature[reqs]], self.device)[0]
        probs = self._filtered_probs(logits[r] / temperature.unsqueeze(1), reqs)  # [S, V]
        tokens[r] = self._draw(probs, reqs)
        return tokens

    def _filtered_probs(self, logits: torch.Tensor, reqs: np.ndarray) -> torch.Tensor:
        """Softmax after the top-k and top-p cuts (each row its own); rows without cuts skip the sort."""
        top_k, top_p = self.top_k[reqs], self.top_p[reqs]
        num_vocab = logits.shape[1]
        is_cut = ((top_k > 0) & (top_k < num_vocab)) | (top_p < 1.0)
        if not is_cut.any():
            return torch.softmax(logits, dim=-1)
        cut = upload([np.flatnonzero(is_cut)], self.device)[0]
        sorted_logits, sorted_idx = logits[cut].sort(dim=-1, descending=True)  # [C, V]
        k = upload([np.where(top_k[is_cut] > 0, top_k[is_cut], num_vocab)], self.device)[0]
        rank = torch.arange(num_vocab, device=self.device)
        sorted_logits.masked_fill_(rank.unsqueeze(0) >= k.unsqueeze(1), -torch.inf)
        # Keep the smallest head whose probability reaches top_p: drop a token when the ones before it
        # already reach it (the first token always stays).
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        p = upload([top_p[is_cut]], self.device)[0]
        sorted_logits.masked_fill_(before >= p.unsqueeze(1), -torch.inf)
        logits[cut] = torch.full_like(sorted_logits, -torch.inf).scatter_(1, sorted_idx, sorted_logits)
        return torch.softmax(logits, dim=-1)

    def _draw(self, probs: torch.Tensor, reqs: np.ndarray) -> torch.Tensor:
        """argmax(probs / Exp(1) noise): a categorical draw without a device sync (gpt-fast's
        multinomial_sample_one_no_sync). Seeded rows draw their noise from their own generator."""
        noise = torch.empty_like(probs)
        is_seeded = self.is_seeded[reqs]
        unseeded = np.flatnonzero(~is_seeded)
        if len(unseeded) == len(reqs):
            noise.exponential_(generator=self.generator)
        elif len(unseeded):
            u = upload([unseeded], self.device)[0]
            noise[u] = torch.empty_like(noise[u]).exponential_(generator=self.generator)
        for i in np.flatnonzero(is_seeded).tolist():
            noise[i].exponential_(generator=self._generator(int(reqs[i])))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, request: int) -> torch.Generator:
        g = self._generators.get(request)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(generator_seed(int(self.seed[request]), self.device))
            self._generators[request] = g
        return g


def generator_seed(seed: int, device: torch.device) -> int:
    """What to give torch's manual_seed for a request's 64-bit seed. The CPU generator (mt19937) reads only
    the seed's low 32 bits, which made 1 and 2**32 + 1 draw the same tokens: there a seed outside [0, 2**32)
    is hashed into 32 bits (two seeds then collide only by chance, 1 in 2**32). CUDA's Philox reads all 64."""
    if device.type != "cpu" or 0 <= seed < 1 << 32:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little")
