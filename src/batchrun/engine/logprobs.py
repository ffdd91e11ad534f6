"""Log-probabilities of the sampled tokens (and the most likely alternatives) for the requests that ask for
them: captured from the model's raw logits before any processor or temperature, as OpenAI and vLLM report
them, and handed to the writer as `TokenLogprob`s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from batchrun.completion import TokenChoice, TokenLogprob
from batchrun.requests import SamplingParams


class Captured(NamedTuple):
    rows: np.ndarray  # the step's rows that want logprobs
    logprobs: torch.Tensor  # float32 [P, V]: log_softmax of their raw logits
    top_ids: np.ndarray  # int64 [P, K]: the K most likely tokens (K = the largest top_logprobs asked)
    top_logprobs: np.ndarray  # float32 [P, K]


class LogprobsRecorder:
    """Per request (plan row): the sampled tokens' logprobs and top alternatives, collected step by step."""

    def __init__(self, params: Sequence[SamplingParams], *, token_bytes: Callable[[int], bytes]) -> None:
        self.wants = np.array([p.logprobs for p in params], bool)
        self.num_top = np.array([p.top_logprobs for p in params], np.int64)
        self.token_bytes = token_bytes
        self._tokens: dict[int, tuple[str, list[int]]] = {}  # token id → its text and bytes, found once
        self._steps: dict[int, list[tuple[int, float, list[int], list[float]]]] = {}

    def capture(self, logits: torch.Tensor, requests: np.ndarray) -> Captured | None:
        """Before the processors and the sampler change `logits` [M, V] (float32): what logprobs need."""
        rows = np.flatnonzero(self.wants[requests])
        if not len(rows):
            return None
        logprobs = torch.log_softmax(logits[torch.from_numpy(rows).to(logits.device)].float(), dim=-1)
        k = int(self.num_top[requests[rows]].max())
        top = logprobs.topk(k, dim=-1) if k else None
        top_ids = top.indices.cpu().numpy() if top else np.zeros((len(rows), 0), np.int64)
        top_logprobs = top.values.cpu().numpy() if top else np.zeros((len(rows), 0), np.float32)
        return Captured(rows, logprobs, top_ids, top_logprobs)

    def record(self, captured: Captured | None, requests: np.ndarray, tokens: np.ndarray) -> None:
        """After sampling `tokens` [M]: appends each capturing request's position."""
        if captured is None:
            return
        sampled = torch.from_numpy(tokens[captured.rows]).to(captured.logprobs.device)
        chosen = captured.logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1).cpu().numpy()
        for i, r in enumerate(requests[captured.rows].tolist()):
            k = int(self.num_top[r])
            self._steps.setdefault(r, []).append((int(tokens[captured.rows[i]]), float(chosen[i]),
                                                  captured.top_ids[i, :k].tolist(),
                                                  captured.top_logprobs[i, :k].tolist()))

    def take(self, request: int) -> list[TokenLogprob] | None:
        """The request's logprobs (None when it asked for none), forgotten here."""
        if not self.wants[request]:
            return None
        steps = self._steps.pop(request, [])
        return [TokenLogprob(*self._token(t, lp), [TokenChoice(*self._token(a, b)) for a, b in zip(ids, lps,
                                                                                                 strict=True)])
                for t, lp, ids, lps in steps]

    def release(self, request: int) -> None:
        self._steps.pop(request, None)

    def _token(self, token: int, logprob: float) -> tuple[str, float, list[int]]:
        """(text, logprob, bytes); a token that is not whole UTF-8 is shown by its bytes, as OpenAI does."""
        known = self._tokens.get(token)
        if known is None:
            raw = self.token_bytes(token)
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            known = self._tokens[token] = (text, list(raw))
        return known[0], logprob, known[1]
