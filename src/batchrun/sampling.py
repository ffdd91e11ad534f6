"""Sampling parameters: `SamplingParams` and their parsing from a request line (plain) or body (OpenAI).

Field checks raise `LineError` naming the field, which requests.py turns into an InvalidLine for that line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchrun import defaults

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (completions: 5)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_TEMPERATURE = 2.0
# The sampler divides float32 logits by the temperature and cuts at top_p in float32: a positive temperature
# below MIN_TEMPERATURE overflows the logits to inf, and a top_p below float32's smallest normal number
# rounds to 0 and keeps no token. Both sampled garbage and reported success; they are refused instead.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1.1754943508222875e-38  # numpy.finfo(numpy.float32).tiny


class LineError(Exception):
    def __init__(self, code: str, field_name: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.field = field_name


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None  # None until planning: an OpenAI chat request without one gets the rest of the context
    min_tokens: int = 0
    temperature: float = defaults.TEMPERATURE
    top_p: float = defaults.TOP_P
    top_k: int = defaults.TOP_K  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by token id
    logprobs: bool = False  # return the sampled tokens' log-probabilities
    top_logprobs: int = 0  # and this many most likely alternatives per position
    response_format: str | None = None  # structured output: canonical JSON of the format (grammar.py)

    def __post_init__(self) -> None:
        # The plan file stores records as JSON, which has no tuples: rebuild them here, once.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        assert self.max_tokens is None or 0 <= self.min_tokens <= self.max_tokens, (self.min_tokens, self.max_tokens)
        assert 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS and (self.logprobs or not self.top_logprobs), self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def parse_sampling(obj: dict[str, Any], *, prefix: str, is_openai_chat: bool = False,
                   is_openai_completions: bool = False) -> SamplingParams:
    """The sampling fields of a plain line or an OpenAI body (`prefix` "body.") → SamplingParams."""
    max_tokens = _max_tokens(obj, prefix=prefix, is_openai_chat=is_openai_chat)
    min_tokens = parse_int(_or(obj, "min_tokens", 0), f"{prefix}min_tokens", low=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise LineError("invalid_value", f"{prefix}min_tokens", f"{min_tokens} is above max_tokens ({max_tokens})")
    top_k = parse_int(_or(obj, "top_k", defaults.TOP_K), f"{prefix}top_k", low=-1)
    seed = obj.get("seed")
    logprobs, top_logprobs = _logprobs(obj, prefix=prefix, is_openai_completions=is_openai_completions)
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=_float(_or(obj, "temperature", defaults.TEMPERATURE), f"{prefix}temperature", 0.0,
                           MAX_TEMPERATURE),
        top_p=_float(_or(obj, "top_p", defaults.TOP_P), f"{prefix}top_p", 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 means "off", as in vLLM
        seed=None if seed is None else parse_int(seed, f"{prefix}seed", low=-(2**63)),
        stop=_stop(obj.get("stop"), f"{prefix}stop"),
        min_p=_float(_or(obj, "min_p", 0.0), f"{prefix}min_p", 0.0, 1.0),
        presence_penalty=_float(_or(obj, "presence_penalty", 0.0), f"{prefix}presence_penalty", -2.0, 2.0),
        frequency_penalty=_float(_or(obj, "frequency_penalty", 0.0), f"{prefix}frequency_penalty", -2.0, 2.0),
        repetition_penalty=_float(_or(obj, "repetition_penalty", 1.0), f"{prefix}repetition_penalty", 0.0, 2.0,
                                  low_open=True),
        logit_bias=_logit_bias(obj.get("logit_bias"), f"{prefix}logit_bias"),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def _or(obj: dict[str, Any], name: str, default: Any) -> Any:
    """The field's value, the default when it is absent or null (OpenAI's SDK sends nulls)."""
    value = obj.get(name)
    return default if value is None else value


def _max_tokens(obj: dict[str, Any], *, prefix: str, is_openai_chat: bool) -> int | None:
    # max_completion_tokens wins when both are given, as in OpenAI, vLLM and SGLang.
    for name in ("max_completion_tokens", "max_tokens"):
        if obj.get(name) is not None:
            return parse_int(obj[name], f"{prefix}{name}", low=1)
    return None if is_openai_chat else defaults.MAX_TOKENS


def _logprobs(obj: dict[str, Any], *, prefix: str, is_openai_completions: bool) -> tuple[bool, int]:
    """(logprobs, top_logprobs): chat and plain say `logprobs: bool` and `top_logprobs: int`; OpenAI
    completions say `logprobs: int`, the number of alternatives (0 returns the sampled tokens' alone)."""
    value = obj.get("logprobs")
    if is_openai_completions:
        if value is None:
            return False, 0
        return True, _int_in(value, f"{prefix}logprobs", high=5)
    if value is not None and not isinstance(value, bool):
        raise LineError("invalid_type", f"{prefix}logprobs", f"must be a boolean, not {kind(value)}")
    top = _int_in(_or(obj, "top_logprobs", 0), f"{prefix}top_logprobs", high=MAX_TOP_LOGPROBS)
    if top and not value:
        raise LineError("invalid_value", f"{prefix}top_logprobs", "needs 'logprobs': true")
    return bool(value), top


def _int_in(value: Any, name: str, *, high: int) -> int:
    number = parse_int(value, name, low=0)
    if number > high:
        raise LineError("invalid_value", name, f"{number} is out of range [0, {high}]")
    return number


def _logit_bias(value: Any, name: str) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} → ((token id, bias), ...) sorted; the ids are checked against the vocabulary
    when planning (the model is known there)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise LineError("invalid_type", name, f"must be an object of token id → bias, not {kind(value)}")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise LineError("invalid_value", name, f"key {key!r} is not a token id")
        pairs.append((int(key), _float(bias, f"{name}.{key}", -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)))
    return tuple(sorted(pairs))


def parse_int(value: Any, name: str, *, low: int) -> int:
    """An integer field of at least `low`; LineError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LineError("invalid_type", name, f"must be an integer, not {kind(value)}")
    if value < low or value >= 2**63:
        raise LineError("invalid_value", name, f"{value} is out of range (at least {low})")
    return value


def _float(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LineError("invalid_type", name, f"must be a number, not {kind(value)}")
    if not value <= high or value < low or (low_open and value == low):  # `not <=`: NaN and inf too
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise LineError("invalid_value", name, f"{value} is out of range {interval}")
    problem = sampling_problem(name.rsplit(".", 1)[-1], float(value))
    if problem is not None:
        raise LineError("invalid_value", name, problem)
    return float(value)


def sampling_problem(field_name: str, value: float) -> str | None:
    """Why a temperature or top_p in range cannot be sampled with in float32, or None."""
    if field_name == "temperature" and 0.0 < value < MIN_TEMPERATURE:
        return f"{value} is too small to sample with in float32: use 0 (greedy) or at least {MIN_TEMPERATURE}"
    if field_name == "top_p" and value < MIN_TOP_P:
        return f"{value} rounds to 0 in float32 (the smallest top_p is {MIN_TOP_P})"
    return None


def _stop(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise LineError("invalid_type", name, "must be a non-empty string or a list of non-empty strings")
    return tuple(stops)


def kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
