"""The planning pipeline and the plan file: validation after tokenization, save/load round trip, checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import orjson
import pytest

from batchrun import planfile
from batchrun.errors import UserError
from batchrun.model.spec import resolve_model
from batchrun.plan import PlanHeader
from batchrun.plan_checks import check_plan
from batchrun.planfile import load_plan, load_plan_header, save_plan
from batchrun.planner import PlannerConfig
from batchrun.planning import build_plan
from batchrun.requests import file_fingerprint
from batchrun.sizes import parse_size
from batchrun.tokenizer import load_tokenizer

SAMPLE = Path(__file__).parent.parent / "sample_data"


@pytest.fixture(scope="module")
def spec():
    return resolve_model("builtin-tiny")


@pytest.fixture(scope="module")
def tokenizer(spec):
    return load_tokenizer(spec)


def config(**overrides) -> PlannerConfig:
    return PlannerConfig(**{"kv_budget_bytes": 1 << 30, "min_prefix_len": 16, "max_levels": 4, "share": True,
                            **overrides})


def write(tmp_path: Path, rows: list[object]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_round_trip_keeps_everything(tmp_path: Path, spec, tokenizer) -> None:
    plan = build_plan(SAMPLE / "requests.jsonl", spec, tokenizer, config())
    save_plan(plan, tmp_path / "p.plan")
    loaded = load_plan(tmp_path / "p.plan")
    assert loaded.header == plan.header
    assert loaded.requests == plan.requests and loaded.invalid == plan.invalid
    assert np.array_equal(loaded.tokens.tokens, plan.tokens.tokens)
    assert np.array_equal(loaded.tokens.indptr, plan.tokens.indptr)
    for f in dataclasses.fields(plan.layout):
        a, b = getattr(plan.layout, f.name), getattr(loaded.layout, f.name)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, f.name
    assert load_plan_header(tmp_path / "p.plan") == plan.header


def test_header_and_records_keep_the_format(tmp_path: Path, spec, tokenizer) -> None:
    """Plans written before the header was typed still load: the header round-trips to the same JSON, with the
    keys of format 1, and a request record is the positional list it always was."""
    plan = build_plan(SAMPLE / "requests.jsonl", spec, tokenizer, config())
    save_plan(plan, tmp_path / "p.plan")
    raw, base = planfile.read_header(tmp_path / "p.plan")
    assert orjson.dumps(PlanHeader.from_json(raw["plan"]).to_json()) == orjson.dumps(raw["plan"])
    assert list(raw["plan"]) == ["input_path", "input_fingerprint", "model_name", "model_path", "model_dtype",
                                 "model_fingerprint", "kv_bytes_per_token", "params", "summary", "created",
                                 "batchrun_version"]
    assert raw["plan"]["params"] == {"kv_budget_bytes": 1 << 30, "min_prefix_len": 16, "max_levels": 4,
                                     "share": True}
    assert list(raw["plan"]["summary"]) == ["requests", "invalid", "prompt_tokens", "prefill_tokens",
                                            "saved_prefill_tokens", "num_groups", "num_levels",
                                            "num_shared_nodes", "num_batches", "max_batch_kv_bytes"]
    assert raw["plan"]["summary"]["requests"] == 240 and raw["layout"]["num_groups"] == plan.layout.num_groups
    r, s = plan.requests[0], plan.requests[0].sampling
    assert planfile.read_records(tmp_path / "p.plan", raw, base)["requests"][0] == [
        r.line, r.id, r.format, r.endpoint, r.model, r.num_samples, r.sample_index,
        s.max_tokens, s.min_tokens, s.temperature, s.top_p, s.top_k, s.seed, list(s.stop),
        s.min_p, s.presence_penalty, s.frequency_penalty, s.repetition_penalty, list(s.logit_bias), s.logprobs,
        s.top_logprobs, s.response_format]


def test_sample_data_shares_prefixes_in_both_formats(spec, tokenizer) -> None:
    plain = build_plan(SAMPLE / "requests.jsonl", spec, tokenizer, config())
    openai = build_plan(SAMPLE / "openai_batch.jsonl", spec, tokenizer, config())
    for plan in (plain, openai):
        s = plan.header.summary
        assert s.num_requests == 240 and s.num_invalid == 0
        assert s.saved_prefill_tokens > 0.5 * s.prompt_tokens
        assert s.num_levels >= 2  # reading instructions → document → question
    # The same prompts give the same tokens whatever the format.
    assert np.array_equal(plain.tokens.tokens, openai.tokens.tokens)


def test_chat_prompt_is_tokenized_through_the_template(tmp_path: Path, spec, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 日本"}]
    plan = build_plan(write(tmp_path, [{"id": "a", "messages": messages}]), spec, tokenizer, config())
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if "input_ids" in expected else expected  # a BatchEncoding in transformers 5
    assert plan.tokens[0].tolist() == list(expected)
    assert plan.tokens[0][0] == tokenizer.bos_token_id and list(plan.tokens[0]).count(tokenizer.bos_token_id) == 1


def test_plain_prompt_gets_one_bos_and_empty_prompt_is_still_valid(tmp_path: Path, spec, tokenizer) -> None:
    plan = build_plan(write(tmp_path, [{"id": "a", "prompt": ""}, {"id": "b", "prompt": "x y"}]), spec, tokenizer,
                      config())
    assert plan.tokens[0].tolist() == [tokenizer.bos_token_id]
    assert plan.tokens[1][0] == tokenizer.bos_token_id


def test_bad_lines_become_records_and_none_is_lost(tmp_path: Path, spec, tokenizer) -> None:
    path = SAMPLE / "bad_lines.jsonl"
    plan = build_plan(path, spec, tokenizer, config())
    nonblank = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    assert sorted([r.line for r in plan.requests] + [r.line for r in plan.invalid]) == nonblank
    assert [r.id for r in plan.requests] == ["ok-1"]
    codes = {r.line: r.code for r in plan.invalid}
    assert codes[2] == "invalid_json" and codes[8] == "duplicate_id" and codes[12] == "context_length_exceeded"
    assert all(r.message for r in plan.invalid)


def test_kv_budget_too_small_for_one_request(tmp_path: Path, spec, tokenizer) -> None:
    path = write(tmp_path, [{"id": "a", "prompt": "word " * 50, "max_tokens": 8}, {"id": "b", "prompt": "x"}])
    budget = 20 * spec.config.kv_bytes_per_token
    plan = build_plan(path, spec, tokenizer, config(kv_budget_bytes=budget))
    assert [r.id for r in plan.requests] == ["b"]
    assert plan.invalid[0].code == "kv_budget_exceeded" and "--kv-budget" in plan.invalid[0].message


def test_unusable_files_are_user_errors(tmp_path: Path, spec, tokenizer) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        build_plan(empty, spec, tokenizer, config())
    csv = tmp_path / "data.csv"
    csv.write_text("id,prompt\n1,hello\n")
    with pytest.raises(UserError, match="not a JSONL file"):
        build_plan(csv, spec, tokenizer, config())
    with pytest.raises(UserError, match="no such file"):
        build_plan(tmp_path / "absent.jsonl", spec, tokenizer, config())


def test_damaged_or_foreign_plan_files_are_user_errors(tmp_path: Path, spec, tokenizer) -> None:
    plan = build_plan(SAMPLE / "requests.jsonl", spec, tokenizer, config())
    path = tmp_path / "p.plan"
    save_plan(plan, path)
    data = path.read_bytes()
    (tmp_path / "cut.plan").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_plan(tmp_path / "cut.plan")
    (tmp_path / "other.plan").write_text("hello")
    with pytest.raises(UserError, match="not a batchrun plan"):
        load_plan(tmp_path / "other.plan")


def test_check_plan_refuses_changed_input_or_model(tmp_path: Path, spec, tokenizer) -> None:
    path = write(tmp_path, [{"id": "a", "prompt": "hello"}])
    plan = build_plan(path, spec, tokenizer, config())
    check_plan(plan.header, input_fingerprint=file_fingerprint(path), model=spec)
    path.write_text('{"id": "a", "prompt": "hello!"}\n')
    with pytest.raises(UserError, match="has changed"):
        check_plan(plan.header, input_fingerprint=file_fingerprint(path), model=spec)
    other = dataclasses.replace(spec, fingerprint="0" * 16)
    with pytest.raises(UserError, match="not the model"):
        check_plan(plan.header, input_fingerprint=None, model=other)


@pytest.mark.parametrize(("text", "size"), [("4GiB", 4 << 30), ("512MiB", 512 << 20), ("2G", 2 * 10**9),
                                            ("1000", 1000), ("1.5KiB", 1536), ("1e9", 10**9)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(UserError):
        parse_size("lots")


def test_empty_chat_message_still_has_the_template_tokens(tmp_path: Path, spec, tokenizer) -> None:
    messages = [{"role": "user", "content": ""}]
    plan = build_plan(write(tmp_path, [{"id": "a", "messages": messages}]), spec, tokenizer, config())
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if "input_ids" in expected else expected
    assert plan.tokens[0].tolist() == list(expected) and len(expected) > 1


def test_plan_into_a_new_folder(tmp_path: Path, spec, tokenizer) -> None:
    plan = build_plan(write(tmp_path, [{"id": "a", "prompt": "x"}]), spec, tokenizer, config())
    save_plan(plan, tmp_path / "new" / "folder" / "p.plan")
    assert load_plan(tmp_path / "new" / "folder" / "p.plan").requests == plan.requests


def test_plan_from_another_version_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "old.plan"
    planfile.write_container(path, {"plan": {"input_path": "x"}}, {"requests": [], "invalid": []}, {})
    with pytest.raises(UserError, match="another version of batchrun"):
        load_plan(path)
    with pytest.raises(UserError, match="another version of batchrun"):
        load_plan_header(path)


def test_samples_rest_of_context_and_logit_bias_are_planned(tmp_path: Path, spec, tokenizer) -> None:
    chat = {"custom_id": "c", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hello there, " * 10}], "n": 3, "seed": 9,
                     "logit_bias": {"5": 1.5}}}
    bad_bias = {"id": "b", "prompt": "x", "logit_bias": {str(spec.config.vocab_size): 1}}
    plan = build_plan(write(tmp_path, [chat, bad_bias]), spec, tokenizer, config())
    assert [(r.id, r.sample_index, r.sampling.seed) for r in plan.requests] == [("c", 0, 9), ("c", 1, 10),
                                                                             ("c", 2, 11)]
    prompt_len = len(plan.tokens.tokens) // 3
    assert all(r.sampling.max_tokens == spec.config.max_position_embeddings - prompt_len for r in plan.requests)
    assert plan.layout.prefill_tokens == prompt_len - 1 + 3  # the samples share their prompt
    (bad,) = plan.invalid
    assert (bad.code, bad.param) == ("invalid_value", "logit_bias")
    save_plan(plan, tmp_path / "p.plan")
    assert load_plan(tmp_path / "p.plan").requests == plan.requests  # logit_bias and samples round-trip


def test_chat_template_file_and_kwargs(tmp_path: Path, spec, tokenizer) -> None:
    template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
                "{% if think %} <think>{% endif %}")
    rows = [{"id": "a", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"think": True}},
            {"id": "b", "messages": [{"role": "user", "content": "hi"}]},
            {"id": "c", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": True}}]
    path = write(tmp_path, rows)
    own = build_plan(path, spec, tokenizer, config())
    custom = build_plan(path, spec, tokenizer, config(), chat_template=template)
    a, b = (custom.tokens.tokens[custom.tokens.indptr[i]:custom.tokens.indptr[i + 1]] for i in range(2))
    assert tokenizer.decode(a) == "[user] hi <think>" and tokenizer.decode(b) == "[user] hi"
    assert [r.message for r in custom.invalid] == ["field 'messages': chat_template_kwargs cannot set tokenize"]
    assert own.header.chat_template_fingerprint is None and custom.header.chat_template_fingerprint
    assert own.header.fingerprint != custom.header.fingerprint
    other = build_plan(path, spec, tokenizer, config(), chat_template=template + " ")
    assert other.header.fingerprint != custom.header.fingerprint
    save_plan(custom, tmp_path / "p.plan")
    assert load_plan_header(tmp_path / "p.plan") == custom.header
