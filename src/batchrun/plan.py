"""The plan: what `batchrun plan` makes (planning.py) and `batchrun run` executes; planfile.py stores it.

The header records fingerprints of the input, the model and the planning parameters, so that `run` can refuse
a plan whose input or model changed (plan_checks.py), and the plan's summary numbers for `plan --show`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchrun.dtypes import DTYPE_BYTES
from batchrun.planner import PlanLayout, PlannerConfig
from batchrun.requests import InvalidLine, Request
from batchrun.tokens import TokenTable

# The summary's JSON keys where they differ from its field names (the plan file's format predates the names).
_SUMMARY_KEYS = {"num_requests": "requests", "num_invalid": "invalid"}


@dataclass(frozen=True)
class PlanSummary:
    """The plan's numbers: its records, then the layout's summary fields (PlanLayout's non-array fields)."""

    num_requests: int  # valid requests
    num_invalid: int  # invalid lines, kept as error records
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens computed: each shared segment once plus every own part
    saved_prefill_tokens: int
    num_groups: int
    num_levels: int
    num_shared_nodes: int
    num_batches: int
    max_batch_kv_bytes: int

    def __post_init__(self) -> None:
        # ValueError, not assert: a summary read from a plan file is checked here (planfile: "damaged").
        if not all(_is_count(v) for v in dataclasses.astuple(self)):
            raise ValueError(f"the plan summary holds a value that is not a count: {self}")
        assert self.saved_prefill_tokens == self.prompt_tokens - self.prefill_tokens, self

    @classmethod
    def of(cls, layout: PlanLayout, *, num_requests: int, num_invalid: int) -> PlanSummary:
        return cls(num_requests=num_requests, num_invalid=num_invalid, **layout_numbers(layout))

    def to_json(self) -> dict[str, int]:
        return {_SUMMARY_KEYS.get(name, name): value for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PlanSummary:
        names = {key: name for name, key in _SUMMARY_KEYS.items()}
        return cls(**{names.get(key, key): value for key, value in obj.items()})


@dataclass(frozen=True)
class PlanHeader:
    input_path: str  # relative to the plan file's folder (absolute in plans made before batchrun recorded it so)
    input_fingerprint: str
    model_name: str
    model_path: str  # a built-in name, or the model directory's absolute path
    model_dtype: str
    model_fingerprint: str
    kv_bytes_per_token: int
    params: PlannerConfig
    summary: PlanSummary
    created: str
    batchrun_version: str
    chat_template_fingerprint: str | None = None  # sha256 of `plan --chat-template FILE`; None: the model's own

    def __post_init__(self) -> None:
        """ValueError for a field of the wrong type or range: a header read from a plan file is checked here."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "str" and not isinstance(value, str):
                raise ValueError(f"plan header field {f.name!r} is not a string: {value!r}")
        if self.model_dtype not in DTYPE_BYTES:
            raise ValueError(f"plan header field 'model_dtype' is not a dtype batchrun runs in: {self.model_dtype!r}")
        if not _is_count(self.kv_bytes_per_token) or self.kv_bytes_per_token == 0:
            raise ValueError("plan header field 'kv_bytes_per_token' is not a positive integer")
        if not isinstance(self.params, PlannerConfig) or not isinstance(self.summary, PlanSummary):
            raise ValueError("plan header fields 'params' and 'summary' must be objects")

    def input_file(self, plan_path: Path) -> Path:
        """The input file of the plan stored at `plan_path` (an absolute input_path stays as it is)."""
        return plan_path.parent / self.input_path

    @property
    def fingerprint(self) -> str:
        """Identifies what the plan computes: its input, its model, its planning parameters and its chat
        template (per-request chat_template_kwargs are in the input)."""
        parts = [self.input_fingerprint, self.model_fingerprint, dataclasses.asdict(self.params)]
        if self.chat_template_fingerprint is not None:  # plans without one keep their fingerprint
            parts.append(self.chat_template_fingerprint)
        key = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(key).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        """The header as the plan file stores it (keys in field order; a plan without its own chat template
        keeps format 1's keys)."""
        obj = {**dataclasses.asdict(self), "summary": self.summary.to_json()}
        if self.chat_template_fingerprint is None:
            del obj["chat_template_fingerprint"]
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PlanHeader:
        """Raises KeyError, TypeError or ValueError when `obj` is not a header of this format."""
        if not isinstance(obj, dict) or not isinstance(obj.get("params"), dict) \
                or not isinstance(obj.get("summary"), dict):
            raise ValueError("the plan header is not an object with 'params' and 'summary' objects")
        return cls(**{**obj, "params": PlannerConfig(**obj["params"]),
                      "summary": PlanSummary.from_json(obj["summary"])})


@dataclass(frozen=True)
class Plan:
    header: PlanHeader
    requests: list[Request]  # valid requests in input order; row i of tokens and of the layout
    invalid: list[InvalidLine]
    tokens: TokenTable
    layout: PlanLayout

    def __post_init__(self) -> None:
        assert len(self.requests) == len(self.tokens) == len(self.layout.request_node)

    @property
    def max_tokens(self) -> np.ndarray:
        return np.fromiter((r.sampling.max_tokens for r in self.requests), np.int32, len(self.requests))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def layout_numbers(layout: PlanLayout) -> dict[str, int]:
    """The layout's summary numbers (its fields that are not arrays), by field name."""
    values = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    return {name: int(v) for name, v in values.items() if not isinstance(v, np.ndarray)}
