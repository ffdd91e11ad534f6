"""OutputWriter: every output format, error lines, the errors file, resume after a kill, exactly-once."""

from __future__ import annotations

import orjson
import pytest
from openai.types import Completion as SdkCompletion
from openai.types.chat import ChatCompletion as SdkChatCompletion

from batchrun.errors import UserError
from batchrun.jsonl import iter_jsonl, repair_torn_tail
from batchrun.output import Completion, OutputWriter, TokenChoice, TokenLogprob, default_errors_path
from batchrun.requests import InvalidLine, Request, SamplingParams

SP = SamplingParams(max_tokens=4, temperature=0.0)


def req(line: int, rid: str, fmt: str = "plain", endpoint: str = "completions", model: str | None = None,
        n: int = 1, index: int = 0):
    return Request(line=line, id=rid, format=fmt, endpoint=endpoint, sampling=SP, model=model, num_samples=n,
                   sample_index=index)


def comp(n: int = 3, reason: str = "length") -> Completion:
    return Completion(token_ids=list(range(10, 10 + n)), text="x" * n, finish_reason=reason, prompt_tokens=7)


def lines(path) -> list[dict]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines()]


def test_plain_success(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as w:
        w.write_completion(req(1, "a"), comp(3, "stop"))
    assert lines(out) == [{
        "id": "a", "text": "xxx", "token_ids": [10, 11, 12], "finish_reason": "stop",
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }]
    assert out.read_bytes().endswith(b"}\n")


def test_openai_completions_success(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputWriter(out, model_name="tiny", system_fingerprint="fp_1") as w:
        w.write_completion(req(1, "c1", "openai", "completions", model="m1"), comp(2))
        w.write_completion(req(2, "c2", "openai", "completions"), comp(2))
    first, second = lines(out)
    assert first["id"].startswith("batch_req_") and first["id"] != second["id"]
    assert first["custom_id"] == "c1" and first["error"] is None
    resp = first["response"]
    assert resp["status_code"] == 200 and resp["request_id"]
    body = resp["body"]
    assert body["object"] == "text_completion" and isinstance(body["created"], int)
    assert body["model"] == "tiny" and body["system_fingerprint"] == "fp_1"  # the model that ran, not "m1"
    assert body["choices"] == [{"text": "xx", "index": 0, "finish_reason": "length", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert second["response"]["body"]["model"] == "tiny"
    SdkCompletion.model_validate(body, strict=True)  # the SDK's own type


def test_openai_chat_success_and_default_model(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputWriter(out, model_name="tiny") as w:
        w.write_completion(req(1, "c1", "openai", "chat"), comp(1, "stop"))
    body = lines(out)[0]["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "x", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert "system_fingerprint" in body
    SdkChatCompletion.model_validate(body, strict=True)


def test_error_lines_of_every_kind(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as w:
        w.write_error(InvalidLine(line=1, id=None, format="plain", code="invalid_json", message="bad"))
        w.write_error(InvalidLine(line=2, id="p2", format="plain", code="invalid_value", message="max_tokens"))
        w.write_error(req(3, "p3"), code="engine_error", message="boom")
        w.write_error(InvalidLine(line=4, id=None, format="openai", code="missing_field", message="custom_id",
                                  param="custom_id"))
        w.write_error(req(5, "o5", "openai"), code="engine_error", message="boom")
    a, b, c, d, e = lines(out)
    assert a == {"id": None, "line": 1, "error": {"code": "invalid_json", "message": "bad"}}
    assert b == {"id": "p2", "line": 2, "error": {"code": "invalid_value", "message": "max_tokens"}}
    assert c == {"id": "p3", "line": 3, "error": {"code": "engine_error", "message": "boom"}}
    # OpenAI's error-file shape: the error in response.body, a 400 (500: the server's fault), error null.
    assert d["id"].startswith("batch_req_") and d["custom_id"] is None and d["error"] is None
    assert d["line"] == 4 and d["response"]["status_code"] == 400 and d["response"]["request_id"]
    assert d["response"]["body"] == {"error": {"message": "custom_id", "type": "invalid_request_error",
                                               "param": "custom_id", "code": "missing_field"}}
    assert e["custom_id"] == "o5" and e["error"] is None and e["response"]["body"]["error"]["code"] == "engine_error"
    assert e["response"]["body"]["error"]["param"] is None


def test_errors_file_gets_error_lines(tmp_path):
    out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    with OutputWriter(out, errors_path=errs) as w:
        w.write_completion(req(1, "a"), comp())
        w.write_error(req(2, "b"), code="engine_error", message="boom")
    assert [x["id"] for x in lines(out)] == ["a"]
    assert [x["id"] for x in lines(errs)] == ["b"]
    with OutputWriter(out, errors_path=errs) as w:  # resume reads both files
        assert w.done_ids() == {"a", "b"} and w.done_lines() == {2}
    with OutputWriter(out, errors_path=out) as w:  # the same file twice is one file
        w.write_error(req(3, "c"), code="engine_error", message="boom")
    assert [x["id"] for x in lines(out)] == ["a", "c"]


def test_done_ids_lines_and_duplicate_id(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as w:
        w.write_completion(req(1, "a"), comp())
        w.write_error(InvalidLine(line=2, id=None, format="plain", code="invalid_json", message="bad"))
        w.write_error(InvalidLine(line=3, id="b", format="plain", code="duplicate_id", message="id b"))
    with OutputWriter(out) as w:
        assert w.num_resumed == 3
        assert w.done_ids() == {"a"}  # "b" named another record: that one is not done
        assert w.done_lines() == {2, 3}
        assert w.is_done(req(1, "a")) and not w.is_done(req(9, "b"))
        assert w.is_done(InvalidLine(line=3, id="b", format="plain", code="duplicate_id", message=""))
        assert not w.is_done(InvalidLine(line=4, id=None, format="plain", code="invalid_json", message=""))


@pytest.mark.parametrize("tail", [
    b'{"id": "c", "text": "tor',  # no newline: killed mid-write
    b'{"id": "c", "text": "torn"\n',  # a newline but not JSON
    b'\x00\x00\x00\n',  # a power loss can leave zeros
])
def test_resume_cuts_torn_last_line(tmp_path, tail):
    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as w:
        w.write_completion(req(1, "a"), comp())
        w.write_completion(req(2, "b"), comp())
    good = out.read_bytes()
    out.write_bytes(good + tail)
    with OutputWriter(out) as w:
        assert w.num_torn_bytes == len(tail)
        assert w.done_ids() == {"a", "b"}
        w.write_completion(req(3, "c"), comp())
    assert [x["id"] for x in lines(out)] == ["a", "b", "c"]
    assert out.read_bytes().startswith(good)  # completed lines are never rewritten


def test_resume_long_torn_line_and_empty_files(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "usage": {}}\n' + b'{"id": "b", "text": "' + b"y" * 200_000)
    assert repair_torn_tail(out) == 200_000 + len(b'{"id": "b", "text": "')
    assert out.read_bytes() == b'{"id": "a", "usage": {}}\n'
    only_torn = tmp_path / "torn.jsonl"
    only_torn.write_bytes(b'{"id": "a"')
    with OutputWriter(only_torn) as w:
        assert w.done_ids() == set()
    assert only_torn.read_bytes() == b""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with OutputWriter(empty) as w:
        assert w.done_ids() == set() and w.num_resumed == 0
    with OutputWriter(tmp_path / "sub" / "new.jsonl") as w:  # created, with its folder
        w.write_completion(req(1, "a"), comp())
    assert lines(tmp_path / "sub" / "new.jsonl")[0]["id"] == "a"


def test_corrupt_middle_line_is_a_user_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "usage": {}}\nnot json\n{"id": "b", "usage": {}}\n')
    with pytest.raises(UserError, match=r"out.jsonl:2: not valid JSON"):
        OutputWriter(out)
    out.write_bytes(b'[1, 2]\n')
    with pytest.raises(UserError, match="not a JSON object"):
        OutputWriter(out)
    out.write_bytes(b'{"line": 3, "error": "x"}\n')
    with pytest.raises(UserError, match="not a batchrun error line"):
        OutputWriter(out)
    assert list(iter_jsonl(tmp_path / "missing.jsonl")) == []


def test_writing_twice_is_a_bug(tmp_path):
    with OutputWriter(tmp_path / "out.jsonl") as w:
        w.write_completion(req(1, "a"), comp())
        with pytest.raises(AssertionError):
            w.write_completion(req(1, "a"), comp())
        with pytest.raises(AssertionError):
            w.write_error(req(2, "b"))  # a run-time error needs a code and a message


@pytest.mark.parametrize("fmt", ["plain", "openai"])
def test_exactly_once_across_kills(tmp_path, fmt):
    """Runs a job in three segments, killing two mid-line; each record ends up in the files exactly once."""
    records: list[Request | InvalidLine] = []
    for i in range(1, 31):
        if i % 7 == 0:
            records.append(InvalidLine(line=i, id=None, format=fmt, code="invalid_json", message="bad"))
        elif i % 11 == 0:
            records.append(InvalidLine(line=i, id=f"r{i - 1}", format=fmt, code="duplicate_id", message="dup"))
        else:
            records.append(req(i, f"r{i}", fmt))
    out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"

    def run_segment(limit: int | None) -> None:
        with OutputWriter(out, errors_path=errs) as w:
            todo = [r for r in records if not w.is_done(r)]
            for n, r in enumerate(todo):
                if limit is not None and n == limit:
                    with open(out, "ab") as f:  # what a kill -9 mid-write leaves
                        f.write(b'{"id": "batch_req_x", "custom_id": "r')
                    return
                if isinstance(r, InvalidLine):
                    w.write_error(r)
                elif r.line % 5 == 0:
                    w.write_error(r, code="engine_error", message="failed at run time")
                else:
                    w.write_completion(r, comp())

    run_segment(8)
    run_segment(9)
    run_segment(None)
    written = lines(out) + lines(errs)
    assert len(written) == len(records)
    assert sorted(x["line"] for x in written if "line" in x) == sorted(
        r.line for r in records if isinstance(r, InvalidLine) or r.line % 5 == 0
    )
    key = "custom_id" if fmt == "openai" else "id"
    ok_ids = [x[key] for x in written if x["response"]["status_code"] == 200] if fmt == "openai" else [
        x["id"] for x in written if "error" not in x
    ]
    assert sorted(ok_ids) == sorted(r.id for r in records if isinstance(r, Request) and r.line % 5)


def test_a_full_disk_names_the_file(tmp_path):
    import os

    from batchrun.jsonl import write_all

    fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    try:
        with pytest.raises(OSError, match="No space left on device") as e:
            write_all(fd, b"{}\n", path=tmp_path / "out.jsonl")
        assert e.value.filename == str(tmp_path / "out.jsonl")
    finally:
        os.close(fd)


LOGPROBS = [
    TokenLogprob("a", -0.5, [97], [TokenChoice("a", -0.5, [97]), TokenChoice("bytes:\\xc3", -1.5, [195])]),
    TokenLogprob(" b", -2.0, [32, 98], [TokenChoice(" b", -2.0, [32, 98]), TokenChoice("c", -2.1, [99])]),
]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_n_choices_with_logprobs_validate_against_the_sdk(tmp_path, endpoint):
    out = tmp_path / "out.jsonl"
    with OutputWriter(out, model_name="tiny", system_fingerprint="fp_1") as w:
        c = Completion(token_ids=[1, 2], text="a b", finish_reason="stop", prompt_tokens=5, logprobs=LOGPROBS)
        assert not w.write_completion(req(1, "x", "openai", endpoint, n=2, index=1), comp(3))
        assert w.write_completion(req(1, "x", "openai", endpoint, n=2, index=0), c)  # the line is complete
    (line,) = lines(out)
    body = line["response"]["body"]
    (SdkChatCompletion if endpoint == "chat" else SdkCompletion).model_validate(body, strict=True)
    assert [ch["index"] for ch in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}  # prompt once
    lp = body["choices"][0]["logprobs"]
    if endpoint == "chat":
        assert lp["content"][1] == {"token": " b", "logprob": -2.0, "bytes": [32, 98], "top_logprobs": [
            {"token": " b", "logprob": -2.0, "bytes": [32, 98]}, {"token": "c", "logprob": -2.1, "bytes": [99]}]}
        assert lp["content"][0]["top_logprobs"][1] == {"token": "bytes:\\xc3", "logprob": -1.5, "bytes": [195]}
        assert lp["refusal"] is None
    else:
        assert lp == {"tokens": ["a", " b"], "token_logprobs": [-0.5, -2.0], "text_offset": [0, 1],
                      "top_logprobs": [{"a": -0.5, "bytes:\\xc3": -1.5}, {" b": -2.0, "c": -2.1}]}
        assert body["choices"][1]["logprobs"] is None


def test_plain_n_choices_and_a_failed_sample(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as w:
        w.write_completion(req(1, "a", n=2, index=1), comp(2))
        w.write_completion(req(1, "a", n=2, index=0), comp(1, "stop"))
        w.write_completion(req(2, "b", n=3, index=0), comp(1))
        assert w.write_error(req(2, "b", n=3, index=1), code="nan_logits", message="nan")
        assert not w.write_error(req(2, "b", n=3, index=2), code="nan_logits", message="nan")  # one line only
        assert not w.write_completion(req(2, "b", n=3, index=2), comp(1))  # dropped: the request failed
    a, b = lines(out)
    assert a == {"id": "a", "choices": [
        {"index": 0, "text": "x", "token_ids": [10], "finish_reason": "stop"},
        {"index": 1, "text": "xx", "token_ids": [10, 11], "finish_reason": "length"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    assert b == {"id": "b", "line": 2, "error": {"code": "nan_logits", "message": "nan"}}


def test_openai_error_file_resumes_and_default_name(tmp_path):
    out = tmp_path / "out.jsonl"
    errs = default_errors_path(out)
    assert errs == tmp_path / "out.errors.jsonl"
    with OutputWriter(out, errors_path=errs) as w:
        w.write_completion(req(1, "a", "openai"), comp())
        w.write_error(InvalidLine(line=2, id="a", format="openai", code="duplicate_id", message="dup"))
        w.write_error(req(3, "c", "openai"), code="nan_logits", message="nan")
    assert [x["custom_id"] for x in lines(out)] == ["a"]
    dup, nan = lines(errs)
    assert dup["response"]["status_code"] == 400 and nan["response"]["status_code"] == 500
    assert nan["response"]["body"]["error"]["type"] == "server_error"
    with OutputWriter(out, errors_path=errs) as w:
        assert w.done_ids() == {"a", "c"} and w.done_lines() == {2, 3}  # the duplicate's id is not done by it


def test_ordered_writes_in_input_order_and_resumes(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [req(1, "a"), InvalidLine(line=2, id=None, format="plain", code="invalid_json", message="bad"),
               req(3, "c", n=2), req(3, "c", n=2, index=1), req(4, "d"), req(5, "e")]
    with OutputWriter(out) as w:
        w.set_order(records)
        w.write_error(records[1])
        w.write_completion(records[4], comp())
        assert out.read_bytes() == b""  # held: line 1 is not written yet
        w.write_completion(records[0], comp())
        assert [x["id"] for x in lines(out)] == ["a", None]
        w.write_completion(records[3], comp())
        w.write_completion(records[2], comp())
        assert [x["id"] for x in lines(out)] == ["a", None, "c", "d"]
        # killed here: "e" was never written
    with OutputWriter(out) as w:
        w.set_order(records)
        assert [w.is_done(r) for r in records] == [True, True, True, True, True, False]
        w.write_completion(records[5], comp())
    assert [x["id"] for x in lines(out)] == ["a", None, "c", "d", "e"]
