"""What a loaded plan must satisfy before anything runs it: every record field of its type and range, and
every layout index inside the arrays it indexes. planfile.load_plan turns a failure (ValueError) into "the
plan file is damaged", so a crafted plan is refused in one line instead of crashing the engine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, get_args

import numpy as np

from batchrun.plan import Plan
from batchrun.requests import OPENAI_URLS, Format, InvalidLine, Request
from batchrun.sampling import MAX_LOGIT_BIAS, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, SamplingParams, sampling_problem

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _int(low: int, high: int = INT64_MAX) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_stop(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) and s for s in v)


def _number_in(low: float, high: float) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and low <= v <= high


def _is_logit_bias(v: Any) -> bool:
    """[[token id, bias], ...] (JSON has no tuples); the ids are checked against the vocabulary by run."""
    return isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and _int(0)(p[0]) and _number_in(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)(p[1])
        for p in v)


_FORMATS = get_args(Format)
_ENDPOINTS = tuple(OPENAI_URLS.values())
# A request record's fields in planfile's order: Request's fields, then SamplingParams' (see planfile).
REQUEST_CHECKS: dict[str, Callable[[Any], bool]] = {
    "line": _int(1), "id": _is_str, "format": lambda v: v in _FORMATS, "endpoint": lambda v: v in _ENDPOINTS,
    "model": _optional(_is_str), "num_samples": _int(1, np.iinfo(np.int32).max), "sample_index": _int(0),
    "max_tokens": _int(1, np.iinfo(np.int32).max), "min_tokens": _int(0),
    "temperature": lambda v: _is_number(v) and 0 <= v <= MAX_TEMPERATURE,
    "top_p": lambda v: _is_number(v) and 0 < v <= 1, "top_k": _int(0), "seed": _optional(_int(INT64_MIN)),
    "stop": _is_stop, "min_p": _number_in(0.0, 1.0), "presence_penalty": _number_in(-2.0, 2.0),
    "frequency_penalty": _number_in(-2.0, 2.0), "repetition_penalty": lambda v: _is_number(v) and 0 < v <= 2,
    "logit_bias": _is_logit_bias, "logprobs": lambda v: isinstance(v, bool),
    "top_logprobs": _int(0, MAX_TOP_LOGPROBS), "response_format": _optional(_is_str),
}
assert tuple(REQUEST_CHECKS) == (*(f.name for f in dataclasses.fields(Request) if f.name != "sampling"),
                                 *(f.name for f in dataclasses.fields(SamplingParams))), "planfile's record order"
INVALID_CHECKS: dict[str, Callable[[Any], bool]] = {
    "line": _int(1), "id": _optional(_is_str), "format": lambda v: v in _FORMATS, "code": _is_str,
    "message": _is_str, "param": _optional(_is_str),
}
assert tuple(INVALID_CHECKS) == tuple(f.name for f in dataclasses.fields(InvalidLine))


def checked_fields(record: Any, checks: dict[str, Callable[[Any], bool]], what: str) -> dict[str, Any]:
    """A positional record → its fields by name; ValueError naming the first field out of type or range."""
    if not isinstance(record, list) or len(record) != len(checks):
        raise ValueError(f"a {what} record is not a list of {len(checks)} fields")
    values = dict(zip(checks, record, strict=True))
    for name, check in checks.items():
        if not check(values[name]):
            raise ValueError(f"a {what} record has a bad {name!r}: {values[name]!r}")
    return values


def request_from_record(record: Any) -> Request:
    """A request record (planfile: Request's fields, then SamplingParams') → Request; ValueError if bad."""
    values = checked_fields(record, REQUEST_CHECKS, "request")
    sampling = {f.name: values.pop(f.name) for f in dataclasses.fields(SamplingParams)}
    sampling["stop"] = tuple(sampling["stop"])  # JSON has no tuples
    sampling["temperature"], sampling["top_p"] = float(sampling["temperature"]), float(sampling["top_p"])
    for name in ("temperature", "top_p"):
        problem = sampling_problem(name, sampling[name])
        if problem is not None:
            raise ValueError(f"request {values['id']!r}: {name} {problem}")
    if sampling["min_tokens"] > sampling["max_tokens"]:
        raise ValueError(f"request {values['id']!r}: min_tokens above max_tokens")
    if sampling["top_logprobs"] and not sampling["logprobs"]:
        raise ValueError(f"request {values['id']!r}: top_logprobs without logprobs")
    if values["sample_index"] >= values["num_samples"]:
        raise ValueError(f"request {values['id']!r}: sample_index not below num_samples")
    return Request(**values, sampling=SamplingParams(**sampling))


def invalid_from_record(record: Any) -> InvalidLine:
    return InvalidLine(**checked_fields(record, INVALID_CHECKS, "invalid line"))


def check_layout(plan: Plan) -> None:
    """Every index of the layout inside what it indexes; ValueError naming the array otherwise. (PlanLayout
    and TokenTable assert their lengths; these are the ranges the engine would index out of.)"""
    layout, num_requests = plan.layout, len(plan.requests)
    num_nodes = len(layout.node_parent)
    prompt_len = plan.tokens.lengths
    _require(bool(np.all(prompt_len >= 1)), "token_indptr", "a request has no prompt tokens")
    _require(_in(layout.node_parent, -1, num_nodes), "node_parent", "out of range")
    _require(_in(layout.node_request, 0, num_requests), "node_request", "out of range")
    _require(_in(layout.request_node, -1, num_nodes), "request_node", "out of range")
    _require(bool(np.array_equal(np.sort(layout.order), np.arange(num_requests))), "order", "not a permutation")
    for name in ("group_indptr", "batch_indptr"):
        _require(bool(np.all(np.diff(getattr(layout, name)) >= 0)), name, "not increasing")
    if num_nodes:
        _require(bool(np.all(layout.node_len >= 1)), "node_len", "a shared prefix is empty")
        _require(bool(np.all(layout.node_len <= prompt_len[layout.node_request])), "node_len",
                 "longer than its member's prompt")
    shared = layout.request_node >= 0
    _require(bool(np.all(layout.node_len[layout.request_node[shared]] < prompt_len[shared])), "request_node",
             "a request's own part is empty")


def _in(values: np.ndarray, low: int, high: int) -> bool:
    """low <= every value < high."""
    return len(values) == 0 or (int(values.min()) >= low and int(values.max()) < high)


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"layout array {name!r}: {problem}")
