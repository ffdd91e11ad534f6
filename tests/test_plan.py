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


def _same_plan(a, b) -> bool:
    arrays = [(a.tokens.tokens, b.tokens.tokens), (a.tokens.indptr, b.tokens.indptr)]
    arrays += [(getattr(a.layout, f.name), getattr(b.layout, f.name)) for f in dataclasses.fields(a.layout)]
    return (a.header == b.header and a.requests == b.requests and a.invalid == b.invalid
            and all(np.array_equal(x, y) for x, y in arrays))


def test_plan_reader_fuzz_refuses_or_loads_identically(tmp_path: Path, spec, tokenizer) -> None:
    """Truncations and single-bit flips anywhere in a plan: refused with one UserError, or loaded identical
    (never a traceback, never a different plan). The checksums make every flip a refusal."""
    rows = [{"id": f"r{i}", "prompt": "You are a careful assistant. " * 3 + f"Question {i}?"} for i in range(6)]
    rows.append({"id": "bad", "prompt": 3})
    plan = build_plan(write(tmp_path, rows), spec, tokenizer, config(min_prefix_len=4))
    good = tmp_path / "good.plan"
    save_plan(plan, good)
    data = good.read_bytes()
    damaged = tmp_path / "damaged.plan"
    rng = np.random.default_rng(0)
    cuts = [*range(0, 200, 7), *rng.integers(0, len(data), 60).tolist()]
    flips = rng.integers(0, len(data) * 8, 400).tolist()
    header, base = planfile.read_header(good)
    is_content = np.zeros(len(data), bool)  # every byte but the alignment padding between sections
    is_content[:len(planfile.MAGIC) + 8 + int.from_bytes(data[14:22], "little") + planfile.DIGEST_SIZE] = True
    for entry in header["sections"].values():
        is_content[base + entry["offset"]: base + entry["offset"] + entry["nbytes"]] = True
    for variant, changed in [(data[:n], True) for n in cuts] + [(_flip(data, b), is_content[b // 8]) for b in flips]:
        damaged.write_bytes(variant)
        try:
            loaded = load_plan(damaged)
        except UserError as e:
            assert "\n" not in str(e)
            continue
        assert not changed and _same_plan(loaded, plan)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_crafted_plans_with_valid_checksums_are_refused(tmp_path: Path, spec, tokenizer) -> None:
    """A plan re-written with recomputed checksums but bad contents: an object dtype (numpy would
    dereference pointers), a huge shape, an index out of range, a sampling value out of range, a bad header."""
    plan = build_plan(write(tmp_path, [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "hello"}]),
                      spec, tokenizer, config())
    path = tmp_path / "p.plan"
    save_plan(plan, path)
    header, base = planfile.read_header(path)
    records = planfile.read_records(path, header, base)
    arrays = planfile.read_arrays(path, header, base)
    head = {k: v for k, v in header.items() if k not in ("format_version", "sections")}
    crafted = tmp_path / "c.plan"

    def refused(match: str, *, header_only: bool = False) -> None:
        with pytest.raises(UserError, match=f"the plan file is damaged: .*{match}"):
            (load_plan_header if header_only else load_plan)(crafted)

    for entry, match in (({"dtype": "|O"}, "dtype"), ({"shape": [1 << 40]}, "size disagree"),
                         ({"offset": -64}, "malformed")):
        _rewrite_sections(path, crafted, "tokens", entry)
        refused(match, header_only=True)
    planfile.write_container(crafted, head, records, {**arrays, "layout.order": np.array([0, 7], np.int32)})
    refused("order")
    t = [*planfile._REQUEST_FIELDS, *planfile._SAMPLING_FIELDS].index("temperature")
    bad = {**records, "requests": [r[:t] + [1e-40] + r[t + 1:] for r in records["requests"]]}
    planfile.write_container(crafted, head, bad, arrays)
    refused("temperature")
    planfile.write_container(crafted, {**head, "plan": {**head["plan"], "kv_bytes_per_token": -1}}, records, arrays)
    refused("kv_bytes_per_token", header_only=True)
    planfile.write_container(crafted, {**head, "plan": {**head["plan"], "summary": [1]}}, records, arrays)
    refused("summary", header_only=True)


def _rewrite_sections(path: Path, target: Path, name: str, entry: dict) -> None:
    """`path` with section `name`'s entry changed and the header's checksum recomputed."""
    header, base = planfile.read_header(path)
    header["sections"][name] |= entry
    head = orjson.dumps(header)
    new_base = planfile._aligned(len(planfile.MAGIC) + 8 + len(head) + planfile.DIGEST_SIZE)
    start = planfile.MAGIC + len(head).to_bytes(8, "little") + head + bytes.fromhex(planfile._digest(head))
    target.write_bytes(start.ljust(new_base, b"\0") + path.read_bytes()[base:])


def test_a_chat_template_that_fails_fails_its_line_only(tmp_path: Path) -> None:
    from batchrun.requests import InputReader
    from batchrun.tokenizer import EncodeError, encode_lines

    class Template:  # a model's template raising what jinja's TemplateError does not cover
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, **kwargs):
            raise TypeError("can only concatenate str (not 'int') to str")

    path = write(tmp_path, [{"id": "a", "messages": [{"role": "user", "content": "hi"}]}])
    (result,) = encode_lines(Template(), list(InputReader(path)))
    assert isinstance(result, EncodeError) and "TypeError" in str(result)


def test_tokens_outside_the_models_vocabulary_are_error_records(tmp_path: Path, spec, tokenizer) -> None:
    small = dataclasses.replace(spec, config=dataclasses.replace(spec.config, vocab_size=5))
    plan = build_plan(write(tmp_path, [{"id": "a", "prompt": "hello there"}]), small, tokenizer, config())
    assert not plan.requests and [r.code for r in plan.invalid] == ["invalid_prompt"]
    assert "outside the model's vocabulary of 5" in plan.invalid[0].message


def test_parse_size_refuses_an_infinite_size() -> None:
    with pytest.raises(UserError, match="too large") as e:
        parse_size("1e400")
    assert e.value.exit_code == 2


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
