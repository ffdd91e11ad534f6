"""Input parsing: both formats, every kind of bad line, and that every non-blank line yields exactly one record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchrun.errors import UserError
from batchrun.requests import InputReader, InvalidLine, ParsedLine, file_fingerprint


def read(tmp_path: Path, lines: list[str]) -> list[ParsedLine | InvalidLine]:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return list(InputReader(path))


def one(tmp_path: Path, obj: object) -> ParsedLine | InvalidLine:
    (record,) = read(tmp_path, [json.dumps(obj)])
    return record


def test_plain_prompt_with_every_sampling_field(tmp_path: Path) -> None:
    rec = one(tmp_path, {"id": "a", "prompt": "hi", "max_tokens": 5, "min_tokens": 2, "temperature": 0.5,
                         "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["x", "yz"]})
    assert isinstance(rec, ParsedLine)
    r, s = rec.request, rec.request.sampling
    assert (r.id, r.line, r.format, r.endpoint, rec.prompt) == ("a", 1, "plain", "completions", "hi")
    assert (s.max_tokens, s.min_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (
        5, 2, 0.5, 0.9, 40, 7, ("x", "yz"))


def test_plain_messages_defaults_and_integer_id(tmp_path: Path) -> None:
    rec = one(tmp_path, {"id": 12, "messages": [{"role": "user", "content": "hi"}]})
    assert isinstance(rec, ParsedLine)
    assert rec.request.id == "12" and rec.request.endpoint == "chat"
    assert rec.prompt == [{"role": "user", "content": "hi"}]
    assert rec.request.sampling.max_tokens == 16 and rec.request.sampling.stop == ()


def test_missing_id_gets_line_number(tmp_path: Path) -> None:
    records = read(tmp_path, ["", json.dumps({"prompt": "x"})])
    assert len(records) == 1 and records[0].request.id == "line-2"


def test_openai_completions_and_chat(tmp_path: Path) -> None:
    comp = {"custom_id": "c1", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": "hi", "max_tokens": 3, "temperature": 0}}
    chat = {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                     "max_completion_tokens": 4}}
    a, b = read(tmp_path, [json.dumps(comp), json.dumps(chat)])
    assert a.request.format == "openai" and a.request.endpoint == "completions" and a.request.model == "m"
    assert a.request.sampling.max_tokens == 3 and a.request.sampling.is_greedy
    assert b.request.endpoint == "chat" and b.prompt == [{"role": "user", "content": "hi"}]
    assert b.request.sampling.max_tokens == 4


BAD_LINES = [
    ('{"id": "x", "prompt": ', "invalid_json", None),
    ('["not", "an", "object"]', "invalid_request", None),
    ('"just a string"', "invalid_request", None),
    ('{"id": "x"}', "missing_field", "prompt"),
    ('{"id": "x", "prompt": "a", "messages": []}', "invalid_request", "prompt"),
    ('{"id": "x", "prompt": 3}', "invalid_type", "prompt"),
    ('{"id": [1], "prompt": "a"}', "invalid_type", "id"),
    ('{"id": "", "prompt": "a"}', "invalid_value", "id"),
    ('{"id": "x", "prompt": "a", "max_tokens": 0}', "invalid_value", "max_tokens"),
    ('{"id": "x", "prompt": "a", "max_tokens": "5"}', "invalid_type", "max_tokens"),
    ('{"id": "x", "prompt": "a", "max_tokens": true}', "invalid_type", "max_tokens"),
    ('{"id": "x", "prompt": "a", "max_tokens": 2, "min_tokens": 3}', "invalid_value", "min_tokens"),
    ('{"id": "x", "prompt": "a", "temperature": 2.5}', "invalid_value", "temperature"),
    ('{"id": "x", "prompt": "a", "top_p": 0}', "invalid_value", "top_p"),
    ('{"id": "x", "prompt": "a", "top_k": -2}', "invalid_value", "top_k"),
    ('{"id": "x", "prompt": "a", "seed": 1.5}', "invalid_type", "seed"),
    ('{"id": "x", "prompt": "a", "stop": [""]}', "invalid_type", "stop"),
    ('{"id": "x", "messages": []}', "invalid_type", "messages"),
    ('{"id": "x", "messages": [{"role": "user"}]}', "missing_field", "messages[0].content"),
    ('{"id": "x", "messages": [{"role": "wizard", "content": "a"}]}', "invalid_value", "messages[0].role"),
    ('{"custom_id": "c", "url": "/v1/embeddings", "body": {}}', "unsupported_url", "url"),
    ('{"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}}', "invalid_value", "method"),
    ('{"custom_id": "c", "url": "/v1/completions"}', "missing_field", "body"),
    ('{"url": "/v1/completions", "body": {"prompt": "a"}}', "missing_field", "custom_id"),
    ('{"custom_id": "c", "url": "/v1/completions", "body": {"messages": []}}', "missing_field", "body.prompt"),
    ('{"custom_id": "c", "url": "/v1/chat/completions", "body": {"stream": true, "messages": '
     '[{"role": "user", "content": "a"}]}}', "unsupported_value", "body.stream"),
    ('{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "a", "n": 0}}', "invalid_value",
     "body.n"),
    # values that used to overflow in float32, parse as another type, or abort the whole plan
    ('{"id": "x", "prompt": "a", "temperature": 1e-40}', "invalid_value", "temperature"),
    ('{"id": "x", "prompt": "a", "top_p": 1e-46}', "invalid_value", "top_p"),
    ('{"id": "x", "prompt": "a", "temperature": 1e400}', "invalid_value", "temperature"),
    ('{"id": "x", "prompt": "a", "max_tokens": 1e400}', "invalid_type", "max_tokens"),
    ('{"id": "x", "prompt": "a", "max_tokens": 1' + "0" * 30 + '}', "invalid_type", "max_tokens"),
    ('{"id": "x", "prompt": "a", "seed": 18446744073709551615}', "invalid_value", "seed"),
    ('{"id": "x", "prompt": "a", "temperature": NaN}', "invalid_json", None),
    ('{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "a", "n": true}}', "invalid_type", "body.n"),
    ('{"custom_id": "c", "url": ["/v1/completions"], "body": {"prompt": "a"}}', "unsupported_url", "url"),
    ('{"custom_id": "c", "url": {"a": 1}, "body": {"prompt": "a"}}', "unsupported_url", "url"),
    ('{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "a", "n": 2, "best_of": 3}}',
     "unsupported_field", "body.best_of"),
    ('{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "a", "echo": true}}', "unsupported_field",
     "body.echo"),
    ('{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "a", "suffix": "z"}}', "unsupported_field",
     "body.suffix"),
    ('{"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "a"}], '
     '"tools": [{"type": "function", "function": {"name": "f"}}]}}', "unsupported_field", "body.tools"),
    ('{"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "a"}], '
     '"response_format": {"type": "grammar"}}}', "invalid_value", "body.response_format"),
    ('{"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "a"}], '
     '"modalities": ["text", "audio"]}}', "unsupported_field", "body.modalities"),
    ('{"id": "x", "prompt": "a", "tool_choice": "auto"}', "unsupported_field", "tool_choice"),
    ('{"id": "x", "prompt": "a", "presence_penalty": 2.5}', "invalid_value", "presence_penalty"),
    ('{"id": "x", "prompt": "a", "frequency_penalty": "1"}', "invalid_type", "frequency_penalty"),
    ('{"id": "x", "prompt": "a", "repetition_penalty": 0}', "invalid_value", "repetition_penalty"),
    ('{"id": "x", "prompt": "a", "min_p": 1.5}', "invalid_value", "min_p"),
    ('{"id": "x", "prompt": "a", "logit_bias": {"abc": 1}}', "invalid_value", "logit_bias"),
    ('{"id": "x", "prompt": "a", "logit_bias": {"5": 101}}', "invalid_value", "logit_bias.5"),
    ('{"id": "x", "prompt": "a", "top_logprobs": 2}', "invalid_value", "top_logprobs"),
    ('{"id": "x", "prompt": "a", "logprobs": true, "top_logprobs": 21}', "invalid_value", "top_logprobs"),
    ('{"id": "x", "prompt": "a", "logprobs": 3}', "invalid_type", "logprobs"),
    ('{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "a", "logprobs": 6}}', "invalid_value",
     "body.logprobs"),
    ('{"id": "x", "messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": [1]}', "invalid_type",
     "chat_template_kwargs"),
]


@pytest.mark.parametrize(("line", "code", "field"), BAD_LINES)
def test_bad_line_names_line_code_and_field(tmp_path: Path, line: str, code: str, field: str | None) -> None:
    records = read(tmp_path, ['{"id": "good", "prompt": "fine"}', line])
    assert isinstance(records[0], ParsedLine)
    bad = records[1]
    assert isinstance(bad, InvalidLine), bad
    assert (bad.line, bad.code) == (2, code)
    if field is not None:
        assert f"field {field!r}" in bad.message, bad.message
        assert bad.param == field


def test_openai_fields_max_completion_tokens_wins_and_chat_default(tmp_path: Path) -> None:
    chat = {"custom_id": "c", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 5,
                     "logprobs": True, "top_logprobs": 2, "n": 3, "seed": 4, "presence_penalty": 0.5,
                     "frequency_penalty": -0.5, "logit_bias": {"7": -100, "3": 2.5}, "min_p": 0.1,
                     "repetition_penalty": 1.2, "chat_template_kwargs": {"enable_thinking": False},
                     "user": "u", "metadata": {"a": "b"}, "tools": [], "tool_choice": "none", "echo": None,
                     "response_format": {"type": "text"}, "best_of": 3}}
    bare_chat = {"custom_id": "d", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user",
                                                                                        "content": "x"}]}}
    bare_completion = {"custom_id": "e", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": 0}}
    a, b, c = read(tmp_path, [json.dumps(chat), json.dumps(bare_chat), json.dumps(bare_completion)])
    s = a.request.sampling
    assert (s.max_tokens, s.logprobs, s.top_logprobs, s.seed) == (5, True, 2, 4)
    assert (s.presence_penalty, s.frequency_penalty, s.min_p, s.repetition_penalty) == (0.5, -0.5, 0.1, 1.2)
    assert s.logit_bias == ((3, 2.5), (7, -100.0)) and s.has_penalties
    assert a.request.num_samples == 3 and a.chat_template_kwargs == {"enable_thinking": False}
    assert b.request.sampling.max_tokens is None  # the rest of the context, resolved when planning
    assert (c.request.sampling.max_tokens, c.request.sampling.logprobs, c.request.sampling.top_logprobs) == (
        16, True, 0)


def test_nulls_mean_the_default(tmp_path: Path) -> None:
    """The openai SDK writes unset optional fields as null."""
    names = ("temperature", "top_p", "top_k", "min_tokens", "max_tokens", "max_completion_tokens", "seed", "stop",
             "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
             "response_format", "tools", "user")
    rec = one(tmp_path, {"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "x", **dict.fromkeys(names)}})
    assert isinstance(rec, ParsedLine), rec
    assert rec.request.sampling == one(tmp_path, {"custom_id": "c", "url": "/v1/completions",
                                                  "body": {"prompt": "x"}}).request.sampling


def test_bad_line_keeps_its_id_and_format(tmp_path: Path) -> None:
    bad = one(tmp_path, {"custom_id": "c9", "url": "/v1/nope", "body": {}})
    assert isinstance(bad, InvalidLine) and (bad.id, bad.format) == ("c9", "openai")


def test_duplicate_id_is_an_error_on_the_second_line_only(tmp_path: Path) -> None:
    first, second = read(tmp_path, ['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'])
    assert isinstance(first, ParsedLine)
    assert isinstance(second, InvalidLine) and second.code == "duplicate_id" and second.line == 2


def test_every_nonblank_line_gives_one_record_and_blank_lines_none(tmp_path: Path) -> None:
    lines = ['{"id": "a", "prompt": "x"}', "", "   ", "garbage", '{"id": "b", "prompt": "y"}', "\t"]
    records = read(tmp_path, lines)
    assert [r.line if isinstance(r, InvalidLine) else r.request.line for r in records] == [1, 4, 5]


def test_fingerprint_matches_file_hash(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "x"}\n\n')
    reader = InputReader(path)
    list(reader)
    assert reader.fingerprint == file_fingerprint(path)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        list(InputReader(tmp_path / "absent.jsonl"))


def test_a_bom_on_the_first_line_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "ho"}\n')
    records = list(InputReader(path))
    assert [r.request.id for r in records if isinstance(r, ParsedLine)] == ["a", "b"]


def test_the_format_is_told_by_custom_id_alone(tmp_path: Path) -> None:
    """A plain line with an extra `url` or `body` field keeps its id and its prompt (other fields are ignored)."""
    records = read(tmp_path, ['{"id": "p1", "prompt": "hi", "url": "https://example.com"}',
                              '{"id": "p2", "prompt": "hi", "body": "text"}'])
    assert [(r.request.id, r.request.format) for r in records] == [("p1", "plain"), ("p2", "plain")]


def test_64_bit_seeds_are_kept(tmp_path: Path) -> None:
    for seed in (2**63 - 1, -(2**63), 2**32 + 1):
        record = one(tmp_path, {"prompt": "a", "seed": seed})
        assert isinstance(record, ParsedLine) and record.request.sampling.seed == seed


def test_an_input_that_is_not_a_regular_file_is_refused() -> None:
    with pytest.raises(UserError, match="not a regular file"):
        list(InputReader(Path("/dev/zero")))
    with pytest.raises(UserError, match="not a regular file"):
        file_fingerprint(Path("/dev/zero"))
