"""The command line end to end, as a user runs it: a subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchrun.errors import UserError
from batchrun.runner import resolve_device

SAMPLE = Path(__file__).parent.parent / "sample_data"


def batchrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchrun", *args], capture_output=True, text=True, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_help_lists_the_commands() -> None:
    result = batchrun("--help")
    assert result.returncode == 0
    for command in ("plan", "run", "stats"):
        assert command in result.stdout


def test_plan_json_then_show(tmp_path: Path) -> None:
    plan_path = tmp_path / "job.plan"
    result = batchrun("plan", str(SAMPLE / "requests.jsonl"), "-o", str(plan_path), "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    for key in ("requests", "invalid", "groups", "prompt_tokens", "prefill_tokens", "saved_prefill_tokens",
                "batches"):
        assert isinstance(summary[key], int), key
    assert summary["requests"] == 240 and summary["invalid"] == 0
    assert summary["prefill_tokens"] + summary["saved_prefill_tokens"] == summary["prompt_tokens"]
    shown = batchrun("plan", "--show", str(plan_path))
    assert shown.returncode == 0, shown.stderr
    assert "groups in execution order" in shown.stdout and "tokens saved by sharing" in shown.stdout
    shown_json = last_json(batchrun("plan", "--show", str(plan_path), "--json").stdout)
    assert shown_json == {k: v for k, v in summary.items() if k != "plan"}


def test_no_share_plans_every_token(tmp_path: Path) -> None:
    result = batchrun("plan", str(SAMPLE / "requests.jsonl"), "-o", str(tmp_path / "p"), "--no-share", "--json")
    summary = last_json(result.stdout)
    assert summary["saved_prefill_tokens"] == 0 and summary["prefill_tokens"] == summary["prompt_tokens"]


def test_bad_lines_are_reported_not_fatal(tmp_path: Path) -> None:
    result = batchrun("plan", str(SAMPLE / "bad_lines.jsonl"), "-o", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    assert "10 invalid line(s)" in result.stderr and "line 2" in result.stderr


def test_user_mistakes_are_one_line_errors_without_traceback(tmp_path: Path) -> None:
    not_jsonl = tmp_path / "table.csv"
    not_jsonl.write_text("a,b\n1,2\n")
    cases = [
        ("plan", str(tmp_path / "absent.jsonl")),
        ("plan", str(not_jsonl)),
        ("plan", str(SAMPLE / "requests.jsonl"), "--model", str(tmp_path)),
        ("plan", str(SAMPLE / "requests.jsonl"), "--kv-budget", "lots"),
        ("run", "--plan", str(not_jsonl), "-o", str(tmp_path / "o.jsonl"), "--kv-budget", "lots"),
        ("plan", "--show", str(not_jsonl)),
        ("plan", str(SAMPLE / "requests.jsonl"), "-o", "/dev/null/job.plan"),  # cannot be written
        ("plan", str(SAMPLE / "requests.jsonl"), "--chat-template", str(tmp_path / "absent.jinja")),
    ]
    for args in cases:
        result = batchrun(*args)
        assert result.returncode in (2, 3), (args, result.returncode)
        assert "Traceback" not in result.stderr, args
        assert result.stderr.strip().startswith("error:"), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


def test_chat_template_file(tmp_path: Path) -> None:
    from batchrun.model.spec import resolve_model
    from batchrun.planfile import load_plan
    from batchrun.tokenizer import load_tokenizer

    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "t.jinja").write_text("{% for m in messages %}<<{{ m.content }}>>{% endfor %}")
    result = batchrun("plan", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "p"), "--chat-template",
                      str(tmp_path / "t.jinja"))
    assert result.returncode == 0, result.stderr
    plan = load_plan(tmp_path / "p")
    assert load_tokenizer(resolve_model("builtin-tiny")).decode(plan.tokens.tokens) == "<<hi>>"
    assert plan.header.chat_template_fingerprint is not None


def test_device_choice() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError):
        resolve_device("tpu")


def test_version() -> None:
    result = batchrun("--version")
    assert result.returncode == 0 and result.stdout.startswith("batchrun ")
