"""What the engine hands the output writer for each finished sample: `Completion`, with its log-probabilities
(`TokenLogprob`) when the request asked for them. No torch: the writer and the distributed driver read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

FinishReason = Literal["stop", "length"]


class TokenChoice(NamedTuple):
    """A token with its natural-log probability: its text, and its own bytes (a token can hold part of a
    character; its text then shows the bytes, as OpenAI's "bytes:\\xe2\\x80")."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(NamedTuple):
    """One output position: the sampled token under the model's own distribution (before penalties,
    temperature and cuts), and the `top_logprobs` most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[TokenChoice]  # most likely first


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per output token, when the request asked for them

    def __post_init__(self) -> None:
        assert self.finish_reason in ("stop", "length"), self.finish_reason
        assert self.prompt_tokens > 0, self.prompt_tokens
        assert self.logprobs is None or len(self.logprobs) == len(self.token_ids), "one logprob per token"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
