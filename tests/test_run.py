"""`batchrun run` and `batchrun stats` end to end, as a user runs them: outputs, error lines, exit codes,
resume after kill -9, refusal of a changed input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

SAMPLE = Path(__file__).parent.parent / "sample_data"


def batchrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchrun", *args], capture_output=True, text=True, timeout=600)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def plan(tmp_path: Path, input_path: Path, name: str = "job.plan") -> Path:
    target = tmp_path / name
    result = batchrun("plan", str(input_path), "-o", str(target))
    assert result.returncode == 0, result.stderr
    return target


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("clean")
    shutil.copy(SAMPLE / "requests.jsonl", tmp / "in.jsonl")
    out = tmp / "out.jsonl"
    result = batchrun("run", "--plan", str(plan(tmp, tmp / "in.jsonl")), "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["completed"] == 240 and summary["failed"] == 0
    return tmp, lines(out)


def test_every_request_once_with_its_limits(clean_run: tuple[Path, list[dict]]) -> None:
    _, rows = clean_run
    inputs = {r["id"]: r for r in map(json.loads, (SAMPLE / "requests.jsonl").read_text().splitlines())}
    assert sorted(r["id"] for r in rows) == sorted(inputs)
    for row in rows:
        n = len(row["token_ids"])
        assert row["usage"]["completion_tokens"] == n <= inputs[row["id"]]["max_tokens"]
        assert row["finish_reason"] in ("stop", "length")
        assert isinstance(row["text"], str) and row["usage"]["prompt_tokens"] > 0


def test_stats_reports_the_run(clean_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    tmp, _ = clean_run
    result = batchrun("stats", str(tmp / "out.jsonl"), "--json", "--plot", str(tmp_path / "run.png"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["requests"] == 240 and report["failed"] == 0
    assert 0 < report["computed_prompt_tokens"] < report["prompt_tokens"]
    assert report["output_tokens"] > 0 and report["wall_seconds"] > 0 and report["peak_kv_bytes"] > 0
    assert (tmp_path / "run.png").stat().st_size > 10_000


def test_resume_after_kill_9_gives_every_request_once(clean_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    _, clean_rows = clean_run
    shutil.copy(SAMPLE / "requests.jsonl", tmp_path / "in.jsonl")
    plan_path, out = plan(tmp_path, tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "batchrun", "run", "--plan", str(plan_path), "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 5):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    num_before = out.read_text().count("\n")
    assert 5 <= num_before < 240, "the run must be killed mid-way for this test to mean anything"
    with out.open("a") as f:
        f.write('{"id": "torn-by-the-kill", "text": "half a li')  # a write cut short by the kill
    result = batchrun("run", "--plan", str(plan_path), "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["resumed"] == num_before
    rows = lines(out)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in clean_rows)
    # Greedy and seeded requests give the same tokens whether or not the run was interrupted.
    by_id = {r["id"]: r["token_ids"] for r in clean_rows}
    assert all(r["token_ids"] == by_id[r["id"]] for r in rows)
    again = batchrun("run", "--plan", str(plan_path), "-o", str(out), "--json")
    assert json.loads(again.stdout.strip().splitlines()[-1])["completed"] == 0 and len(lines(out)) == 240


def test_run_takes_its_own_kv_budget_and_step_size_and_says_what_it_used(
        clean_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    _, clean_rows = clean_run
    (tmp_path / "in.jsonl").write_text("".join((SAMPLE / "requests.jsonl").read_text().splitlines(True)[:6]))
    out = tmp_path / "out.jsonl"
    result = batchrun("run", "--plan", str(plan(tmp_path, tmp_path / "in.jsonl")), "-o", str(out),
                      "--kv-budget", "2MiB", "--max-step-tokens", "64")
    assert result.returncode == 0, result.stderr
    assert "KV budget 2.0 MiB (given): 512 tokens; up to 64 tokens a step" in result.stderr
    run_info = json.loads((tmp_path / "out.jsonl.metrics.jsonl").read_text().splitlines()[0])
    assert run_info["kv_budget_bytes"] == 2 << 20 and run_info["max_step_tokens"] == 64
    by_id = {r["id"]: r["token_ids"] for r in clean_rows}
    assert all(r["token_ids"] == by_id[r["id"]] for r in lines(out)) and len(lines(out)) == 6


def test_bad_lines_become_error_lines_and_exit_1(tmp_path: Path) -> None:
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    result = batchrun("run", "--plan", str(plan(tmp_path, SAMPLE / "bad_lines.jsonl")), "-o", str(out),
                      "--errors", str(errors))
    assert result.returncode == 1, result.stderr
    assert [r["id"] for r in lines(out)] == ["ok-1"]
    error_rows = lines(errors)
    nonblank = [i + 1 for i, line in enumerate((SAMPLE / "bad_lines.jsonl").read_text().splitlines()) if line.strip()]
    assert sorted(r["line"] for r in error_rows) == nonblank[1:]
    openai_rows = [r for r in error_rows if "custom_id" in r]
    assert all(r["error"]["code"] and r["error"]["message"] for r in error_rows if r not in openai_rows)
    assert openai_rows and all(r["error"] is None and r["response"]["status_code"] == 400 for r in openai_rows)
    assert all(r["response"]["body"]["error"]["code"] and r["response"]["body"]["error"]["message"]
               for r in openai_rows)


def test_openai_batch_output(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = batchrun("run", "--plan", str(plan(tmp_path, SAMPLE / "openai_batch.jsonl")), "-o", str(out),
                      "--threads", "1")
    assert result.returncode == 0, result.stderr
    rows = lines(out)
    assert len(rows) == 240 and len({r["custom_id"] for r in rows}) == 240
    for row in rows:
        body = row["response"]["body"]
        assert row["response"]["status_code"] == 200 and row["error"] is None
        assert body["object"] in ("text_completion", "chat.completion")
        choice = body["choices"][0]
        assert ("message" in choice) == (body["object"] == "chat.completion")
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        assert body["model"] == "builtin-tiny" and body["system_fingerprint"].startswith("fp_")
        (ChatCompletion if body["object"] == "chat.completion" else Completion).model_validate(body, strict=True)
    assert lines(tmp_path / "out.errors.jsonl") == []  # the error file is made, and empty


def test_openai_errors_go_to_a_separate_file_by_default(tmp_path: Path) -> None:
    good = {"custom_id": "a", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    lines_in = [good, {**good, "custom_id": "b", "body": {**good["body"], "tools": [{"type": "function"}]}},
                {**good, "body": {**good["body"], "max_tokens": 3}}]  # a duplicate custom_id
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines_in) + "not json\n")
    out = tmp_path / "out.jsonl"
    result = batchrun("run", "--plan", str(plan(tmp_path, tmp_path / "in.jsonl")), "-o", str(out), "--json")
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["errors"] == str(tmp_path / "out.errors.jsonl")
    (ok,) = lines(out)
    assert ok["custom_id"] == "a" and ok["response"]["body"]["model"] == "builtin-tiny"  # the first "a" keeps it
    errors = {r["line"]: r for r in lines(tmp_path / "out.errors.jsonl")}
    assert sorted(errors) == [2, 3, 4]
    assert errors[2]["response"]["body"]["error"]["param"] == "body.tools"
    assert errors[3]["response"]["body"]["error"]["code"] == "duplicate_id" and errors[3]["custom_id"] == "a"
    stats = batchrun("stats", str(out), "--json")  # finds the error file from the run's records
    assert stats.returncode == 0, stats.stderr
    report = json.loads(stats.stdout.splitlines()[-1])
    assert (report["requests"], report["failed"]) == (1, 3)


def test_changed_input_is_refused(tmp_path: Path) -> None:
    input_path = tmp_path / "in.jsonl"
    input_path.write_text('{"id": "a", "prompt": "hello"}\n')
    plan_path = plan(tmp_path, input_path)
    input_path.write_text('{"id": "a", "prompt": "hello there"}\n')
    result = batchrun("run", "--plan", str(plan_path), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 3 and "has changed" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_plan_is_a_one_line_error(tmp_path: Path) -> None:
    result = batchrun("run", "--plan", str(tmp_path / "absent.plan"), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 3 and result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1


def test_ordered_output_follows_the_input_with_samples_and_logprobs(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "prompt": f"Question {i}: " + "word " * (i % 4), "max_tokens": 1 + (7 * i) % 9,
             "temperature": 0} for i in range(10)]
    rows[3] = {**rows[3], "n": 3, "temperature": 1.0, "seed": 5, "logprobs": True, "top_logprobs": 2}
    text = "".join(json.dumps(r) + "\n" for r in rows[:6]) + "not json\n" + "".join(
        json.dumps(r) + "\n" for r in rows[6:])
    (tmp_path / "in.jsonl").write_text(text)
    out = tmp_path / "out.jsonl"
    result = batchrun("run", "--plan", str(plan(tmp_path, tmp_path / "in.jsonl")), "-o", str(out), "--ordered",
                      "--threads", "1")
    assert result.returncode == 1, result.stderr  # the bad line
    got = lines(out)
    assert [r["id"] for r in got] == [f"q{i}" for i in range(6)] + [None] + [f"q{i}" for i in range(6, 10)]
    choices = got[3]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and got[3]["usage"]["completion_tokens"] == sum(
        len(c["token_ids"]) for c in choices)
    assert all(len(c["logprobs"]) == len(c["token_ids"]) and len(c["logprobs"][0]["top_logprobs"]) == 2
               for c in choices)
