"""Input lines → Request or InvalidLine: the two input formats (plain and OpenAI batch) and their validation.

Every non-blank line becomes exactly one of the two, so that every line ends as exactly one output line.
A bad line never stops the read: it becomes an InvalidLine naming its line number and the field at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

from batchrun import defaults
from batchrun.errors import UserError

Format = Literal["plain", "openai"]
Endpoint = Literal["completions", "chat"]
Prompt = str | list[dict[str, str]]  # a completion prompt, or chat messages
OPENAI_URLS: dict[str, Endpoint] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
ROLES = ("system", "user", "assistant", "tool", "developer")
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, as some editors write at the start of a file
MAX_TEMPERATURE = 2.0
# The sampler divides float32 logits by the temperature and cuts at top_p in float32: a positive temperature
# below MIN_TEMPERATURE overflows the logits to inf, and a top_p below float32's smallest normal number
# rounds to 0 and keeps no token. Both sampled garbage and reported success; they are refused instead.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1.1754943508222875e-38  # numpy.finfo(numpy.float32).tiny


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    min_tokens: int = 0
    temperature: float = defaults.TEMPERATURE
    top_p: float = defaults.TOP_P
    top_k: int = defaults.TOP_K  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        assert 0 <= self.min_tokens <= self.max_tokens, (self.min_tokens, self.max_tokens)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    line: int  # 1-based line number in the input file
    id: str  # plain "id" (an integer id is kept as its decimal string), or OpenAI "custom_id"
    format: Format
    endpoint: Endpoint
    sampling: SamplingParams
    model: str | None = None  # OpenAI body.model, echoed in the response


@dataclass(frozen=True)
class InvalidLine:
    line: int
    id: str | None
    format: Format
    code: str  # "invalid_json", "invalid_request", "missing_field", "invalid_value", "duplicate_id", ...
    message: str  # names the field at fault


@dataclass(frozen=True)
class ParsedLine:
    """A valid line before tokenization: the request and its prompt (dropped once tokenized)."""

    request: Request
    prompt: Prompt


class LineError(Exception):
    def __init__(self, code: str, field_name: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.field = field_name


class InputReader:
    """Streams an input JSONL file: yields ParsedLine | InvalidLine per non-blank line, and hashes the bytes.

    `fingerprint` (sha256 of the file's bytes) is complete once the iteration has finished.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hash = hashlib.sha256()
        self._seen_ids: set[str] = set()
        self.num_lines = 0

    @property
    def fingerprint(self) -> str:
        return self._hash.hexdigest()

    def __iter__(self) -> Iterator[ParsedLine | InvalidLine]:
        with open_regular_file(self.path) as f:
            for line_no, raw in enumerate(f, start=1):
                self._hash.update(raw)
                self.num_lines = line_no
                if line_no == 1:
                    raw = raw.removeprefix(BOM)
                if raw.strip():
                    yield self._parse(line_no, raw)

    def _parse(self, line_no: int, raw: bytes) -> ParsedLine | InvalidLine:
        try:
            obj = _loads(raw)
        except ValueError as e:
            return InvalidLine(line_no, None, "plain", "invalid_json", f"line is not valid JSON: {e} (JSONL holds "
                               "one JSON object per line: an object written over several lines is invalid)")
        fmt: Format = "openai" if isinstance(obj, dict) and _looks_openai(obj) else "plain"
        rid = _peek_id(obj, fmt)
        try:
            parsed = parse_object(obj, line_no)
        except LineError as e:
            where = f"field {e.field!r}: " if e.field else ""
            return InvalidLine(line_no, rid, fmt, e.code, where + str(e))
        key = parsed.request.id
        if key in self._seen_ids:
            name = "custom_id" if fmt == "openai" else "id"
            message = f"field {name!r}: duplicate id {key!r} (ids must be unique in the file)"
            return InvalidLine(line_no, key, fmt, "duplicate_id", message)
        self._seen_ids.add(key)
        return parsed


def _loads(raw: bytes) -> Any:
    """orjson, or for what it refuses (a number beyond float64 or int64, e.g. `1e400`) the standard parser,
    which reads it as inf or a big int, so that the field at fault is named; NaN and Infinity stay invalid."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as e:
            raise ValueError(str(e)) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _looks_openai(obj: dict[str, Any]) -> bool:
    # Only custom_id marks an OpenAI batch line: a plain line may carry any other field (ignored).
    return "custom_id" in obj


def _peek_id(obj: Any, fmt: Format) -> str | None:
    if not isinstance(obj, dict):
        return None
    value = obj.get("custom_id" if fmt == "openai" else "id")
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    return None


def parse_object(obj: Any, line_no: int) -> ParsedLine:
    """One decoded JSON line → ParsedLine; raises LineError naming the field at fault."""
    if not isinstance(obj, dict):
        raise LineError("invalid_request", None, f"each line must be a JSON object, not {_kind(obj)}")
    if _looks_openai(obj):
        return _parse_openai(obj, line_no)
    return _parse_plain(obj, line_no)


def _parse_plain(obj: dict[str, Any], line_no: int) -> ParsedLine:
    if "body" in obj and "prompt" not in obj and "messages" not in obj:
        raise LineError("missing_field", "custom_id", "an OpenAI batch line needs a 'custom_id'")
    rid = _id_field(obj, "id", default=f"line-{line_no}")
    endpoint, prompt = _prompt_fields(obj, prefix="")
    sampling = _sampling(obj, prefix="")
    return ParsedLine(Request(line_no, rid, "plain", endpoint, sampling), prompt)


def _parse_openai(obj: dict[str, Any], line_no: int) -> ParsedLine:
    rid = _id_field(obj, "custom_id", default=None)
    method = obj.get("method", "POST")
    if method != "POST":
        raise LineError("invalid_value", "method", f"must be \"POST\", not {method!r}")
    url = obj.get("url")
    if not isinstance(url, str) or url not in OPENAI_URLS:
        supported = ", ".join(OPENAI_URLS)
        raise LineError("unsupported_url", "url", f"{url!r} is not supported (supported: {supported})")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("missing_field" if body is None else "invalid_type", "body", "must be a JSON object")
    endpoint = OPENAI_URLS[url]
    if body.get("stream"):
        raise LineError("unsupported_value", "body.stream", "streaming is not supported in a batch")
    n = _int(body.get("n", 1), "body.n", low=1)
    if n != 1:
        raise LineError("unsupported_value", "body.n", f"only n=1 is supported, not {n!r}")
    key = "messages" if endpoint == "chat" else "prompt"
    if key not in body:
        raise LineError("missing_field", f"body.{key}", f"{url} needs {key!r}")
    _, prompt = _prompt_fields({key: body[key]}, prefix="body.")
    model = body.get("model")
    sampling = _sampling(body, prefix="body.")
    return ParsedLine(Request(line_no, rid, "openai", endpoint, sampling, model if isinstance(model, str) else None),
                      prompt)


def _id_field(obj: dict[str, Any], name: str, *, default: str | None) -> str:
    value = obj.get(name)
    if value is None:
        if default is None:
            raise LineError("missing_field", name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise LineError("invalid_type", name, f"must be a string or an integer, not {_kind(value)}")
    if isinstance(value, str) and not value:
        raise LineError("invalid_value", name, "must not be empty")
    return str(value)


def _prompt_fields(obj: dict[str, Any], *, prefix: str) -> tuple[Endpoint, Prompt]:
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        raise LineError("invalid_request", f"{prefix}prompt", "give either 'prompt' or 'messages', not both")
    if not has_prompt and not has_messages:
        raise LineError("missing_field", f"{prefix}prompt", "each request needs 'prompt' or 'messages'")
    if has_prompt:
        prompt = obj["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # OpenAI allows a list of prompts; one is one request
        if not isinstance(prompt, str):
            raise LineError("invalid_type", f"{prefix}prompt", f"must be a string, not {_kind(prompt)}")
        return "completions", prompt
    return "chat", _messages(obj["messages"], f"{prefix}messages")


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise LineError("invalid_type", name, "must be a non-empty list of {role, content} objects")
    messages = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise LineError("invalid_type", where, f"must be an object, not {_kind(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise LineError("invalid_value", f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        if "content" not in m or m["content"] is None:
            raise LineError("missing_field", f"{where}.content", "every message needs content")
        messages.append({"role": role, "content": _content_text(m["content"], f"{where}.content")})
    return messages


def _content_text(content: Any, name: str) -> str:
    if isinstance(content, str):
        return content
    # OpenAI's list-of-parts form; only text parts can be fed to a text model.
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise LineError("invalid_type", name, "must be a string or a list of text parts")


def _sampling(obj: dict[str, Any], *, prefix: str) -> SamplingParams:
    max_tokens = obj.get("max_tokens", obj.get("max_completion_tokens", defaults.MAX_TOKENS))
    max_tokens = _int(max_tokens, f"{prefix}max_tokens", low=1)
    min_tokens = _int(obj.get("min_tokens", 0), f"{prefix}min_tokens", low=0)
    if min_tokens > max_tokens:
        raise LineError("invalid_value", f"{prefix}min_tokens", f"{min_tokens} is above max_tokens ({max_tokens})")
    top_k = _int(obj.get("top_k", defaults.TOP_K), f"{prefix}top_k", low=-1)
    seed = obj.get("seed")
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=_float(obj.get("temperature", defaults.TEMPERATURE), f"{prefix}temperature", 0.0,
                           MAX_TEMPERATURE),
        top_p=_float(obj.get("top_p", defaults.TOP_P), f"{prefix}top_p", 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 means "off", as in vLLM
        seed=None if seed is None else _int(seed, f"{prefix}seed", low=-(2**63)),
        stop=_stop(obj.get("stop"), f"{prefix}stop"),
    )


def _int(value: Any, name: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LineError("invalid_type", name, f"must be an integer, not {_kind(value)}")
    if value < low or value >= 2**63:
        raise LineError("invalid_value", name, f"{value} is out of range (at least {low})")
    return value


def _float(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LineError("invalid_type", name, f"must be a number, not {_kind(value)}")
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


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, as InputReader computes it while reading; UserError when it is missing or
    not a regular file."""
    h = hashlib.sha256()
    with open_regular_file(path, missing="the plan was made from it; it must still be there") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def open_regular_file(path: Path, *, missing: str = "") -> BinaryIO:
    """`path` opened for reading; UserError when it is missing, unreadable, or not a regular file (a device
    such as /dev/zero, a pipe: its end may never come, and it cannot be read twice to check it)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file" + (f" ({missing})" if missing else "")) from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise UserError(f"{path}: not a regular file (an input is a JSONL file)")
    return f
