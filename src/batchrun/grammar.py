"""Structured output formats: a request's `response_format` (OpenAI's `json_object` and `json_schema`, in both
input formats) as a canonical string kept in the plan, and its xgrammar grammar. No torch; xgrammar is imported
only when a request asks for structured output (`pip install 'batchrun[structured]'`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from batchrun.sampling import LineError

_XGRAMMAR_LOCATION = re.compile(r"^\[[^]]*\] \S+:\d+: ")  # "[15:17:05] /project/cpp/x.cc:5082: "


def parse_response_format(value: Any, name: str) -> str | None:
    """OpenAI's `response_format` → None (plain text) or its canonical JSON (`{"type": "json_object"}`, or
    `{"type": "json_schema", "schema": ...}`); LineError when it is malformed or its schema is not usable."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        fmt: dict[str, Any] = {"type": "json_object"}
    elif kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise LineError("invalid_value", f"{name}.json_schema.schema", "must be a JSON schema object")
        fmt = {"type": "json_schema", "schema": schema}
    else:
        raise LineError("invalid_value", name, 'must be {"type": "text" | "json_object" | "json_schema", ...}')
    canonical = orjson.dumps(fmt).decode()  # keys as given: a schema's property order is its output's order
    try:
        grammar_of(canonical)
    except ImportError:
        raise LineError("unsupported_field", name, "structured output needs xgrammar: "
                        "pip install 'batchrun[structured]'") from None
    except (RuntimeError, ValueError) as e:  # xgrammar's errors for a schema it cannot turn into a grammar
        reason = _XGRAMMAR_LOCATION.sub("", str(e).strip().splitlines()[0])
        raise LineError("invalid_value", f"{name}.json_schema.schema", f"not a usable JSON schema ({reason})"
                        ) from None
    return canonical


def grammar_of(canonical: str) -> Any:
    """The xgrammar Grammar of a canonical response format: json_object is any JSON object. JSON is written
    without free whitespace (", " and ": " separators): a model, or the built-in random one, can otherwise pad
    forever."""
    import xgrammar as xgr

    fmt = orjson.loads(canonical)
    if fmt["type"] == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    return xgr.Grammar.from_json_schema(orjson.dumps(fmt["schema"]).decode(), any_whitespace=False)
