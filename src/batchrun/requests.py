"""Input lines → Request or InvalidLine. (Parsing lands in the next commit; the types are the contract.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Format = Literal["plain", "openai"]
Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    line: int  # 1-based line number in the input file
    id: str  # plain "id", or OpenAI "custom_id"
    format: Format
    endpoint: Endpoint
    sampling: SamplingParams
    model: str | None = None  # OpenAI body.model, echoed in the response


@dataclass(frozen=True)
class InvalidLine:
    line: int
    id: str | None
    format: Format
    code: str  # e.g. "invalid_json", "missing_field", "invalid_value", "duplicate_id", "prompt_too_long"
    message: str  # names the field at fault
