"""Structured output: response_format (json_object, json_schema) in both input formats, through the whole
run with the built-in model. Its tokens are random, so the grammar alone must make every output parse as JSON
and validate against its schema (jsonschema, the reference), ending with finish_reason "stop"."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest
import torch
from rich.console import Console

from batchrun.engine.structured import StructuredOutput
from batchrun.model.spec import resolve_model
from batchrun.planfile import save_plan
from batchrun.planner import PlannerConfig
from batchrun.planning import build_plan
from batchrun.requests import InputReader, InvalidLine, ParsedLine, SamplingParams
from batchrun.runner import run_plan_file
from batchrun.tokenizer import load_tokenizer, token_bytes_of

SCHEMA = {
    "type": "object",
    "properties": {
        # Not maxLength: xgrammar 0.2.9 lets a string with maxLength hold raw control characters (invalid JSON).
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def lines(path: Path) -> list[dict]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines()]


def test_response_format_is_parsed_and_checked(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "x", "response_format": JSON_SCHEMA},
        {"id": "b", "prompt": "x", "response_format": {"type": "json_object"}},
        {"id": "c", "prompt": "x", "response_format": {"type": "text"}},
        {"id": "d", "prompt": "x", "response_format": {"type": "xml"}},
        {"id": "e", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {
            "type": "objectx"}}}},
        {"id": "f", "prompt": "x", "min_tokens": 2, "response_format": {"type": "json_object"}},
        {"custom_id": "g", "url": "/v1/completions", "body": {"prompt": "x", "response_format": {"type": "json_schema",
                                                                                                "json_schema": 3}}},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b, c, d, e, f, g = InputReader(path)
    assert isinstance(a, ParsedLine) and json.loads(a.request.sampling.response_format) == {
        "type": "json_schema", "schema": SCHEMA}
    assert list(json.loads(a.request.sampling.response_format)["schema"]["properties"]) == list(SCHEMA["properties"])
    assert isinstance(b, ParsedLine) and b.request.sampling.response_format == '{"type":"json_object"}'
    assert isinstance(c, ParsedLine) and c.request.sampling.response_format is None
    assert isinstance(d, InvalidLine) and (d.code, d.param) == ("invalid_value", "response_format")
    assert isinstance(e, InvalidLine) and e.param == "response_format.json_schema.schema"
    assert 'Unsupported type "objectx"' in e.message and "/project" not in e.message
    assert isinstance(f, InvalidLine) and (f.code, f.param) == ("invalid_request", "min_tokens")
    assert isinstance(g, InvalidLine) and g.param == "body.response_format.json_schema.schema"


def test_mask_touches_only_structured_rows() -> None:
    spec = resolve_model("builtin-tiny")
    params = [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, response_format='{"type":"json_object"}')]
    structured = StructuredOutput(params, tokenizer=load_tokenizer(spec), vocab_size=spec.config.vocab_size,
                                  eos_token_ids=spec.config.eos_token_ids)
    logits = torch.randn(3, spec.config.vocab_size)
    before = logits.clone()
    rows = structured.apply(logits, np.array([0, 1, 0]))
    assert rows.tolist() == [1]
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(load_tokenizer(spec).decode([t]).lstrip().startswith("{") for t in allowed)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_parse_and_validate_in_both_formats(tmp_path: Path, temperature: float) -> None:
    """Greedy decoding of the random model can repeat a token forever inside a free-form JSON string, so
    json_object (any keys) is checked with sampling, and with room for long strings; the schema bounds its
    strings and runs greedy too."""
    rows = []
    for i in range(6):
        fmt = JSON_SCHEMA if i % 2 == 0 or temperature == 0 else {"type": "json_object"}
        sampling = {"max_tokens": 300 if fmt is JSON_SCHEMA else 1500, "temperature": temperature}
        rows.append({"id": f"p{i}", "prompt": f"Describe person {i} as JSON:", "seed": i, "n": 2,
                     "response_format": fmt, **sampling})
        rows.append({"custom_id": f"o{i}", "url": "/v1/chat/completions", "body": {
            "messages": [{"role": "user", "content": f"Person {i}, as JSON."}], "seed": i,
            "response_format": fmt, **sampling}})
    rows.append({"id": "free", "prompt": "no format", "max_tokens": 5, "temperature": temperature})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = resolve_model("builtin-tiny")
    plan = build_plan(path, spec, load_tokenizer(spec), PlannerConfig(kv_budget_bytes=1 << 30, min_prefix_len=16,
                                                                      max_levels=4, share=True))
    save_plan(plan, tmp_path / "p.plan")
    out = tmp_path / "out.jsonl"
    outcome = run_plan_file(tmp_path / "p.plan", out, errors_path=tmp_path / "errors.jsonl", model=None,
                            device="cpu", console=Console(quiet=True), threads=1)
    assert outcome.is_clean and lines(tmp_path / "errors.jsonl") == []
    checked = 0
    for row in lines(out):
        rid = row.get("custom_id", row.get("id"))
        if rid == "free":
            continue
        i = int(rid[1:])
        if "custom_id" in row:
            choices = [(c["message"]["content"], c["finish_reason"]) for c in row["response"]["body"]["choices"]]
        else:
            choices = [(c["text"], c["finish_reason"]) for c in row["choices"]]
        for text, reason in choices:
            assert reason == "stop", (rid, text)
            value = json.loads(text)
            assert isinstance(value, dict)
            if i % 2 == 0 or temperature == 0:
                jsonschema.validate(value, SCHEMA)
            checked += 1
    assert checked == 6 * 2 + 6


def test_token_bytes_agree_with_xgrammars_vocabulary() -> None:
    """The logprobs' `bytes` (tokenizer.token_bytes_of) against xgrammar's own decoding of the vocabulary."""
    import xgrammar as xgr

    tokenizer = load_tokenizer(resolve_model("builtin-tiny"))
    info = xgr.TokenizerInfo.from_huggingface(tokenizer)
    token_bytes = token_bytes_of(tokenizer)
    special = set(tokenizer.all_special_ids)
    mismatches = [i for i in range(len(tokenizer)) if i not in special and token_bytes(i) != info.decoded_vocab[i]]
    assert mismatches == []
    assert token_bytes(194) == b"\x00" and len(token_bytes(100)) == 1  # bytes that are not text on their own
