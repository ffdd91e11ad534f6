"""OpenAI Batch API output and error lines, field for field as OpenAI writes them (and the openai SDK's
`ChatCompletion` / `Completion` types read the bodies): `success_line`, `error_line`.

An error line is OpenAI's error-file shape, `response: {status_code, request_id, body: {error: {message, type,
param, code}}}` with `error: null`, plus batchrun's `line` (the input line, which resume needs).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from batchrun.completion import Completion, TokenChoice, TokenLogprob
from batchrun.requests import Request

# Run-time failures that are the server's fault, not the request's (HTTP 500); every other error is a 400.
SERVER_ERROR_CODES = frozenset({"nan_logits"})


def success_line(request: Request, choices: Sequence[Completion], *, model: str | None,
                 system_fingerprint: str | None) -> dict[str, Any]:
    """The output line of a request whose samples (`choices`, in sample order) all finished."""
    suffix = uuid.uuid4().hex
    first = choices[0]
    completion_tokens = sum(c.completion_tokens for c in choices)
    body = {
        "id": f"{'chatcmpl' if request.endpoint == 'chat' else 'cmpl'}-{suffix}",
        "object": "chat.completion" if request.endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": system_fingerprint,
        "choices": [_choice(request, i, c) for i, c in enumerate(choices)],
        "usage": {  # the prompt is counted once, as OpenAI counts it for n > 1
            "prompt_tokens": first.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": first.prompt_tokens + completion_tokens,
        },
    }
    return {
        "id": batch_request_id(),
        "custom_id": request.id,
        "response": {"status_code": 200, "request_id": f"req_{suffix}", "body": body},
        "error": None,
    }


def _choice(request: Request, index: int, completion: Completion) -> dict[str, Any]:
    if request.endpoint == "chat":
        return {
            "index": index,
            "message": {"role": "assistant", "content": completion.text, "refusal": None},
            "logprobs": None if completion.logprobs is None else chat_logprobs(completion.logprobs),
            "finish_reason": completion.finish_reason,
        }
    return {
        "text": completion.text,
        "index": index,
        "logprobs": None if completion.logprobs is None else completions_logprobs(completion.logprobs),
        "finish_reason": completion.finish_reason,
    }


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's shape: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal}`."""
    def entry(choice: TokenChoice | TokenLogprob) -> dict[str, Any]:
        return {"token": choice.token, "logprob": choice.logprob, "bytes": choice.bytes}

    content = [{**entry(p), "top_logprobs": [entry(t) for t in p.top]} for p in logprobs]
    return {"content": content, "refusal": None}


def completions_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Completions' shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` ({token: logprob} per
    position), `text_offset` (each token's start in the text)."""
    offsets, offset = [], 0
    for p in logprobs:
        offsets.append(offset)
        offset += len(p.token)
    return {
        "tokens": [p.token for p in logprobs],
        "token_logprobs": [p.logprob for p in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in p.top} for p in logprobs],
        "text_offset": offsets,
    }


def error_line(*, custom_id: str | None, line: int, code: str, message: str, param: str | None) -> dict[str, Any]:
    is_server = code in SERVER_ERROR_CODES
    error = {"message": message, "type": "server_error" if is_server else "invalid_request_error", "param": param,
             "code": code}
    return {
        "id": batch_request_id(),
        "custom_id": custom_id,
        "line": line,
        "response": {"status_code": 500 if is_server else 400, "request_id": f"req_{uuid.uuid4().hex}",
                     "body": {"error": error}},
        "error": None,
    }


def error_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The error an OpenAI-format line reports ({code, ...}), or None for a success line."""
    if obj.get("error") is not None:  # batchrun's former shape, and OpenAI's for batch-level failures
        return obj["error"]
    response = obj.get("response")
    if isinstance(response, dict) and response.get("status_code") != 200:
        body = response.get("body")
        error = body.get("error") if isinstance(body, dict) else None
        return error if isinstance(error, dict) else {}
    return None


def batch_request_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"
