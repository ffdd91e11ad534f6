"""The planning pipeline, what `batchrun plan` runs: input.jsonl → requests (bad lines kept as InvalidLine
records) → token ids → validation against the model and the KV budget → planner layout → Plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from batchrun import __version__
from batchrun.errors import EXIT_USAGE, UserError
from batchrun.model.spec import ModelSpec
from batchrun.plan import Plan, PlanHeader, PlanSummary
from batchrun.planfile import check_plan_target, save_plan
from batchrun.planner import PlannerConfig, plan_requests
from batchrun.requests import InputReader, InvalidLine, ParsedLine, Request
from batchrun.sizes import human_bytes
from batchrun.tokenizer import EncodeError, encode_lines
from batchrun.tokens import TokenTable

ENCODE_CHUNK = 4096  # lines tokenized per batch: big enough for the Rust tokenizer, small enough for memory


def build_plan(input_path: Path, spec: ModelSpec, tokenizer: Any, config: PlannerConfig, *,
               chat_template: str | None = None) -> Plan:
    """Reads, validates and tokenizes the input, then plans it. Bad lines become InvalidLine records.
    A request with n samples becomes n rows with the same prompt (the planner shares it); `chat_template`
    replaces the model's."""
    reader = InputReader(input_path)
    requests: list[Request] = []
    invalid: list[InvalidLine] = []
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    num_json = 0
    for batch in _chunks(reader, ENCODE_CHUNK):
        parsed = [p for p in batch if isinstance(p, ParsedLine)]
        num_json += sum(1 for p in batch if not (isinstance(p, InvalidLine) and p.code == "invalid_json"))
        encoded = iter(encode_lines(tokenizer, parsed, chat_template=chat_template))
        for item in batch:
            if isinstance(item, InvalidLine):
                invalid.append(item)
                continue
            ids = next(encoded)
            request = _with_max_tokens(item.request, ids, spec)
            problem = _token_problem(request, ids, spec, config)
            if problem is not None:
                invalid.append(problem)
                continue
            row = np.asarray(ids, dtype=np.int32)
            for sample in samples(request):
                requests.append(sample)
                chunks.append(row)
                lengths.append(len(ids))
    if reader.num_lines == 0 or not (requests or invalid):
        raise UserError(f"{input_path}: the file is empty (expected one JSON request per line)")
    if num_json == 0:
        raise UserError(f"{input_path}: not a JSONL file (no line is a JSON value; expected one request per line)")
    _check_budget_fits_any(invalid, requests, config)
    invalid = _with_file_format(invalid, requests)
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    tokens = TokenTable(np.concatenate(chunks) if chunks else np.zeros(0, np.int32), indptr)
    max_tokens = np.fromiter((r.sampling.max_tokens for r in requests), np.int32, len(requests))
    layout = plan_requests(tokens, max_tokens, kv_bytes_per_token=spec.config.kv_bytes_per_token, config=config)
    header = PlanHeader(
        chat_template_fingerprint=None if chat_template is None else hashlib.sha256(chat_template.encode()).hexdigest(),
        input_path=str(input_path.resolve()),
        input_fingerprint=reader.fingerprint,
        model_name=spec.name,
        model_path=spec.location,
        model_dtype=spec.config.dtype,
        model_fingerprint=spec.fingerprint,
        kv_bytes_per_token=spec.config.kv_bytes_per_token,
        params=config,
        summary=PlanSummary.of(layout, num_requests=len(requests), num_invalid=len(invalid)),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        batchrun_version=__version__,
    )
    return Plan(header=header, requests=requests, invalid=sorted(invalid, key=lambda r: r.line),
                tokens=tokens, layout=layout)


def plan_to_file(input_path: Path, target: Path, *, spec: ModelSpec, tokenizer: Any,
                 config: PlannerConfig, chat_template: str | None = None) -> Plan:
    """build_plan, then the plan saved at `target` with its input path recorded relative to the plan's folder,
    so that moving the folder that holds both keeps `run` working."""
    if target.is_dir():
        example = target / (input_path.stem + ".plan")
        raise UserError(f"{target} is a directory: give the plan's file name (e.g. {example})", exit_code=EXIT_USAGE)
    check_plan_target(target, input_path=input_path)
    plan = build_plan(input_path, spec, tokenizer, config, chat_template=chat_template)
    relative = os.path.relpath(input_path.resolve(), target.resolve().parent)
    plan = dataclasses.replace(plan, header=dataclasses.replace(plan.header, input_path=relative))
    save_plan(plan, target)
    return plan


def _check_budget_fits_any(invalid: list[InvalidLine], requests: list[Request], config: PlannerConfig) -> None:
    """A KV budget that no request fits is a mistake in the options, not in the input: refused as such."""
    if requests or not invalid or any(r.code != "kv_budget_exceeded" for r in invalid):
        return
    raise UserError(f"no request fits the KV budget of {human_bytes(config.kv_budget_bytes)}; line "
                    f"{invalid[0].line}: {invalid[0].message}", exit_code=EXIT_USAGE)


def read_chat_template(path: Path | None) -> str | None:
    """The text of `plan --chat-template FILE`; UserError when it cannot be read."""
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as e:
        raise UserError(f"--chat-template {path}: cannot be read ({e.strerror})") from None


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


def samples(request: Request) -> list[Request]:
    """A request's rows: itself, or its n samples, sample i seeded with seed + i (each its own stream)."""
    if request.num_samples == 1:
        return [request]
    seed = request.sampling.seed
    return [dataclasses.replace(request, sample_index=i, sampling=dataclasses.replace(
        request.sampling, seed=None if seed is None else seed + i)) for i in range(request.num_samples)]


def _with_max_tokens(request: Request, ids: list[int] | EncodeError, spec: ModelSpec) -> Request:
    """An OpenAI chat request without max_tokens gets the rest of the context (OpenAI's default)."""
    if request.sampling.max_tokens is not None:
        return request
    rest = spec.config.max_position_embeddings - (0 if isinstance(ids, EncodeError) else len(ids))
    # Never below min_tokens: a prompt that leaves less room fails the context check, with the numbers.
    sampling = dataclasses.replace(request.sampling, max_tokens=max(rest, request.sampling.min_tokens, 1))
    return dataclasses.replace(request, sampling=sampling)


def _token_problem(req: Request, ids: list[int] | EncodeError, spec: ModelSpec,
                   config: PlannerConfig) -> InvalidLine | None:
    """Why these token ids cannot be run, as an InvalidLine, or None."""
    field = ("body." if req.format == "openai" else "") + ("messages" if req.endpoint == "chat" else "prompt")

    def problem(code: str, message: str, name: str | None = field) -> InvalidLine:
        where = "" if name is None else f"field {name!r}: "  # None: not a field's fault
        return InvalidLine(req.line, req.id, req.format, code, where + message, param=name)

    if isinstance(ids, EncodeError):
        return problem("invalid_prompt", str(ids))
    if not ids:
        return problem("empty_prompt", "the prompt has no tokens (the model adds no BOS token)")
    if max(ids) >= spec.config.vocab_size:  # a tokenizer larger than the model's embedding table
        return problem("invalid_prompt", f"token id {max(ids)} is outside the model's vocabulary of "
                       f"{spec.config.vocab_size} (its tokenizer has tokens its embedding lacks)")
    context = spec.config.max_context_len
    max_tokens = req.sampling.max_tokens
    assert max_tokens is not None, "resolved by _with_max_tokens"
    if len(ids) + max_tokens > context:
        return problem("context_length_exceeded", f"{len(ids)} prompt tokens plus max_tokens {max_tokens} exceed "
                       f"{spec.config.context_name} of {context} tokens")
    need = (len(ids) + max_tokens) * spec.config.kv_bytes_per_token
    if need > config.kv_budget_bytes:  # not the prompt's fault: the option is too small for it
        return problem("kv_budget_exceeded", f"this request alone needs {human_bytes(need)} of KV cache, above the "
                       f"KV budget of {human_bytes(config.kv_budget_bytes)} (raise --kv-budget)", name=None)
    vocab_size = spec.config.vocab_size
    if any(not 0 <= token < vocab_size for token, _ in req.sampling.logit_bias):
        name = ("body." if req.format == "openai" else "") + "logit_bias"
        return problem("invalid_value", f"a token id is outside the vocabulary (0 to {vocab_size - 1})", name)
    return None
