"""Input lines → Request or InvalidLine: the two input formats (plain and OpenAI batch) and their validation.

Every non-blank line becomes exactly one of the two, so that every line ends as exactly one output line.
A bad line never stops the read: it becomes an InvalidLine naming its line number and the field at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

from batchrun.errors import UserError
from batchrun.grammar import parse_response_format
from batchrun.openai_fields import check_unsupported
from batchrun.sampling import LineError, SamplingParams, kind, parse_int, parse_sampling

Format = Literal["plain", "openai"]
Endpoint = Literal["completions", "chat"]
Prompt = str | list[dict[str, str]]  # a completion prompt, or chat messages
OPENAI_URLS: dict[str, Endpoint] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
ROLES = ("system", "user", "assistant", "tool", "developer")
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, as some editors write at the start of a file


@dataclass(frozen=True)
class Request:
    line: int  # 1-based line number in the input file
    id: str  # plain "id" (an integer id is kept as its decimal string), or OpenAI "custom_id"
    format: Format
    endpoint: Endpoint
    sampling: SamplingParams
    model: str | None = None  # OpenAI body.model as the request gave it (the response names the model that ran)
    num_samples: int = 1  # n: the samples of one request share its prompt and make one output line
    sample_index: int = 0  # which of them this row is (planning expands a request into its samples)

    def __post_init__(self) -> None:
        assert 0 <= self.sample_index < self.num_samples, (self.sample_index, self.num_samples)


@dataclass(frozen=True)
class InvalidLine:
    line: int
    id: str | None
    format: Format
    code: str  # "invalid_json", "invalid_request", "missing_field", "invalid_value", "duplicate_id", ...
    message: str  # names the field at fault
    param: str | None = None  # the field at fault (OpenAI's error "param")


@dataclass(frozen=True)
class ParsedLine:
    """A valid line before tokenization: the request and its prompt (dropped once tokenized)."""

    request: Request
    prompt: Prompt
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template


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
            return InvalidLine(line_no, rid, fmt, e.code, where + str(e), param=e.field)
        key = parsed.request.id
        if key in self._seen_ids:
            name = "custom_id" if fmt == "openai" else "id"
            message = f"field {name!r}: duplicate id {key!r} (ids must be unique in the file)"
            return InvalidLine(line_no, key, fmt, "duplicate_id", message, param=name)
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
        raise LineError("invalid_request", None, f"each line must be a JSON object, not {kind(obj)}")
    if _looks_openai(obj):
        return _parse_openai(obj, line_no)
    return _parse_plain(obj, line_no)


def _parse_plain(obj: dict[str, Any], line_no: int) -> ParsedLine:
    if "body" in obj and "prompt" not in obj and "messages" not in obj:
        raise LineError("missing_field", "custom_id", "an OpenAI batch line needs a 'custom_id'")
    rid = _id_field(obj, "id", default=f"line-{line_no}")
    check_unsupported(obj, prefix="")
    endpoint, prompt = _prompt_fields(obj, prefix="")
    sampling = _sampling(obj, prefix="")
    request = Request(line_no, rid, "plain", endpoint, sampling, num_samples=_num_samples(obj, prefix=""))
    return ParsedLine(request, prompt, _template_kwargs(obj, prefix=""))


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
    check_unsupported(body, prefix="body.")
    key = "messages" if endpoint == "chat" else "prompt"
    if key not in body:
        raise LineError("missing_field", f"body.{key}", f"{url} needs {key!r}")
    _, prompt = _prompt_fields({key: body[key]}, prefix="body.")
    model = body.get("model")
    sampling = _sampling(body, prefix="body.", is_openai_chat=endpoint == "chat",
                         is_openai_completions=endpoint == "completions")
    request = Request(line_no, rid, "openai", endpoint, sampling, model if isinstance(model, str) else None,
                      num_samples=_num_samples(body, prefix="body."))
    return ParsedLine(request, prompt, _template_kwargs(body, prefix="body."))


def _sampling(obj: dict[str, Any], *, prefix: str, **kw: bool) -> SamplingParams:
    sampling = parse_sampling(obj, prefix=prefix, **kw)
    response_format = parse_response_format(obj.get("response_format"), f"{prefix}response_format")
    if response_format is None:
        return sampling
    if sampling.min_tokens:  # the grammar's end is an EOS, which min_tokens would forbid
        raise LineError("invalid_request", f"{prefix}min_tokens", "cannot be combined with a response_format")
    return dataclasses.replace(sampling, response_format=response_format)


def _num_samples(obj: dict[str, Any], *, prefix: str) -> int:
    n = 1 if obj.get("n") is None else parse_int(obj["n"], f"{prefix}n", low=1)
    best_of = obj.get("best_of")
    if best_of is not None and best_of != n:  # best_of == n is plain sampling; more needs ranking by logprob
        raise LineError("unsupported_field", f"{prefix}best_of", f"best_of {best_of!r} other than n is not supported")
    return n


def _template_kwargs(obj: dict[str, Any], *, prefix: str) -> dict[str, Any] | None:
    value = obj.get("chat_template_kwargs")
    if value is not None and not isinstance(value, dict):
        raise LineError("invalid_type", f"{prefix}chat_template_kwargs", f"must be an object, not {kind(value)}")
    return value or None


def _id_field(obj: dict[str, Any], name: str, *, default: str | None) -> str:
    value = obj.get(name)
    if value is None:
        if default is None:
            raise LineError("missing_field", name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise LineError("invalid_type", name, f"must be a string or an integer, not {kind(value)}")
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
            raise LineError("invalid_type", f"{prefix}prompt", f"must be a string, not {kind(prompt)}")
        return "completions", prompt
    return "chat", _messages(obj["messages"], f"{prefix}messages")


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise LineError("invalid_type", name, "must be a non-empty list of {role, content} objects")
    messages = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise LineError("invalid_type", where, f"must be an object, not {kind(m)}")
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
