"""The plan: what `batchrun plan` makes and `batchrun run` executes, and the pipeline that builds it.

input.jsonl → requests (InvalidLine records kept) → token ids → planner layout → plan file. The plan
records fingerprints of the input, the model and the planning parameters so that `run` can refuse a plan
whose input or model changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchrun import __version__, planfile
from batchrun.errors import UserError
from batchrun.model.spec import ModelSpec
from batchrun.planner import PlanLayout, PlannerConfig, plan_requests
from batchrun.requests import InputReader, InvalidLine, ParsedLine, Request, SamplingParams
from batchrun.tokenizer import EncodeError, encode_lines
from batchrun.tokens import TokenTable

ENCODE_CHUNK = 4096  # lines tokenized per batch: big enough for the Rust tokenizer, small enough for memory


@dataclass(frozen=True)
class PlanHeader:
    input_path: str
    input_fingerprint: str
    model_name: str
    model_path: str  # a built-in name, or the model directory's absolute path
    model_dtype: str
    model_fingerprint: str
    kv_bytes_per_token: int
    params: dict[str, Any]  # PlannerConfig fields
    summary: dict[str, Any]
    created: str
    batchrun_version: str

    @property
    def fingerprint(self) -> str:
        """Identifies what the plan computes: its input, its model and its planning parameters."""
        key = orjson.dumps([self.input_fingerprint, self.model_fingerprint, self.params], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(key).hexdigest()[:16]


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


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '2G', '1e9' or a plain number of bytes → bytes; UserError when it is not a size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise UserError(f"{text!r} is not a size (examples: 4GiB, 512MiB, 2000000000)", exit_code=2)
    number, unit, binary = float(m.group(1)), m.group(2), m.group(3).startswith("i")
    power = "_kmgt".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def build_plan(input_path: Path, spec: ModelSpec, tokenizer: Any, config: PlannerConfig) -> Plan:
    """Reads, validates and tokenizes the input, then plans it. Bad lines become InvalidLine records."""
    reader = InputReader(input_path)
    requests: list[Request] = []
    invalid: list[InvalidLine] = []
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    num_json = 0
    for batch in _chunks(reader, ENCODE_CHUNK):
        parsed = [p for p in batch if isinstance(p, ParsedLine)]
        num_json += sum(1 for p in batch if not (isinstance(p, InvalidLine) and p.code == "invalid_json"))
        encoded = iter(encode_lines(tokenizer, parsed))
        for item in batch:
            if isinstance(item, InvalidLine):
                invalid.append(item)
                continue
            ids = next(encoded)
            problem = _token_problem(item, ids, spec, config)
            if problem is not None:
                invalid.append(problem)
                continue
            requests.append(item.request)
            chunks.append(np.asarray(ids, dtype=np.int32))
            lengths.append(len(ids))
    if reader.num_lines == 0 or not (requests or invalid):
        raise UserError(f"{input_path}: the file is empty (expected one JSON request per line)")
    if num_json == 0:
        raise UserError(f"{input_path}: not a JSONL file (no line is a JSON value; expected one request per line)")
    invalid = _with_file_format(invalid, requests)
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    tokens = TokenTable(np.concatenate(chunks) if chunks else np.zeros(0, np.int32), indptr)
    max_tokens = np.fromiter((r.sampling.max_tokens for r in requests), np.int32, len(requests))
    layout = plan_requests(tokens, max_tokens, kv_bytes_per_token=spec.config.kv_bytes_per_token, config=config)
    header = PlanHeader(
        input_path=str(input_path.resolve()),
        input_fingerprint=reader.fingerprint,
        model_name=spec.name,
        model_path=spec.location,
        model_dtype=spec.config.dtype,
        model_fingerprint=spec.fingerprint,
        kv_bytes_per_token=spec.config.kv_bytes_per_token,
        params=dataclasses.asdict(config),
        summary={"requests": len(requests), "invalid": len(invalid), **_layout_summary(layout)},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        batchrun_version=__version__,
    )
    return Plan(header=header, requests=requests, invalid=sorted(invalid, key=lambda r: r.line),
                tokens=tokens, layout=layout)


def _with_file_format(invalid: list[InvalidLine], requests: list[Request]) -> list[InvalidLine]:
    """A line that is not JSON has no format of its own: give it the file's (the first request's), so that
    an OpenAI batch file gets OpenAI-shaped error lines throughout."""
    if not requests or requests[0].format == "plain":
        return invalid
    return [dataclasses.replace(r, format=requests[0].format) if r.code == "invalid_json" else r for r in invalid]


def _chunks(reader: InputReader, size: int) -> Iterator[list[ParsedLine | InvalidLine]]:
    batch: list[ParsedLine | InvalidLine] = []
    for item in reader:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _token_problem(parsed: ParsedLine, ids: list[int] | EncodeError, spec: ModelSpec,
                   config: PlannerConfig) -> InvalidLine | None:
    """Why these token ids cannot be run, as an InvalidLine, or None."""
    req = parsed.request
    field = ("body." if req.format == "openai" else "") + ("messages" if req.endpoint == "chat" else "prompt")
    if isinstance(ids, EncodeError):
        return InvalidLine(req.line, req.id, req.format, "invalid_prompt", f"field {field!r}: {ids}")
    if not ids:
        return InvalidLine(req.line, req.id, req.format, "empty_prompt",
                           f"field {field!r}: the prompt has no tokens (the model adds no BOS token)")
    context = spec.config.max_position_embeddings
    max_tokens = req.sampling.max_tokens
    if len(ids) + max_tokens > context:
        return InvalidLine(req.line, req.id, req.format, "context_length_exceeded",
                           f"field {field!r}: {len(ids)} prompt tokens plus max_tokens {max_tokens} exceed "
                           f"the model's context of {context} tokens")
    need = (len(ids) + max_tokens) * spec.config.kv_bytes_per_token
    if need > config.kv_budget_bytes:
        return InvalidLine(req.line, req.id, req.format, "kv_budget_exceeded",
                           f"field {field!r}: this request alone needs {need} bytes of KV cache, above the KV "
                           f"budget of {config.kv_budget_bytes} bytes (raise --kv-budget)")
    return None


def _layout_summary(layout: PlanLayout) -> dict[str, Any]:
    """The layout's summary numbers (its fields that are not arrays)."""
    values = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    return {name: int(v) for name, v in values.items() if not isinstance(v, np.ndarray)}


# -- the file -------------------------------------------------------------------------------------------------


def save_plan(plan: Plan, path: Path) -> None:
    """Writes the plan atomically (see planfile)."""
    header = dataclasses.asdict(plan.header)
    records = {
        "requests": [_request_record(r) for r in plan.requests],
        "invalid": [[r.line, r.id, r.format, r.code, r.message] for r in plan.invalid],
    }
    arrays = {"tokens": plan.tokens.tokens, "token_indptr": plan.tokens.indptr}
    arrays |= {f"layout.{f.name}": getattr(plan.layout, f.name) for f in dataclasses.fields(plan.layout)
               if isinstance(getattr(plan.layout, f.name), np.ndarray)}
    planfile.write_container(path, {"plan": header, "layout": _layout_summary(plan.layout)}, records, arrays)


def load_plan(path: Path) -> Plan:
    header, base = planfile.read_header(path)
    records = planfile.read_records(path, header, base)
    arrays = planfile.read_arrays(path, header, base)
    with _damaged_if_malformed(path):
        layout_fields = {f.name: arrays.get(f"layout.{f.name}", header["layout"].get(f.name))
                         for f in dataclasses.fields(PlanLayout)}
        return Plan(
            header=PlanHeader(**header["plan"]),
            requests=[_request_from_record(r) for r in records["requests"]],
            invalid=[InvalidLine(*r) for r in records["invalid"]],
            tokens=TokenTable(arrays["tokens"], arrays["token_indptr"]),
            layout=PlanLayout(**layout_fields),
        )


def load_plan_header(path: Path) -> PlanHeader:
    """The header alone (fast): for checks and summaries that need no arrays."""
    header, _ = planfile.read_header(path)
    with _damaged_if_malformed(path):
        return PlanHeader(**header["plan"])


@contextmanager
def _damaged_if_malformed(path: Path) -> Iterator[None]:
    """A plan whose parts do not fit together (damaged, or written by another batchrun) is a UserError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise UserError(f"{path}: the plan file is damaged or was made by another version of batchrun "
                        f"({type(e).__name__}: {e}); make it again with `batchrun plan`") from None


def _request_record(r: Request) -> list[Any]:
    s = r.sampling
    return [r.line, r.id, r.format, r.endpoint, r.model,
            s.max_tokens, s.min_tokens, s.temperature, s.top_p, s.top_k, s.seed, list(s.stop)]


def _request_from_record(rec: list[Any]) -> Request:
    line, rid, fmt, endpoint, model, max_tokens, min_tokens, temperature, top_p, top_k, seed, stop = rec
    sampling = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop))
    return Request(line=line, id=rid, format=fmt, endpoint=endpoint, sampling=sampling, model=model)


# -- checks before a run --------------------------------------------------------------------------------------


def check_plan(header: PlanHeader, *, input_fingerprint: str | None, model: ModelSpec) -> None:
    """Refuses (UserError) a plan whose input file or model has changed since it was made."""
    if input_fingerprint is not None and input_fingerprint != header.input_fingerprint:
        raise UserError(f"the input file {header.input_path} has changed since the plan was made; "
                        "make the plan again with `batchrun plan`")
    if model.fingerprint != header.model_fingerprint:
        raise UserError(f"model {model.name!r} is not the model the plan was made for ({header.model_name!r}, "
                        f"fingerprint {header.model_fingerprint}, this one {model.fingerprint}); "
                        "use that model or make the plan again")
