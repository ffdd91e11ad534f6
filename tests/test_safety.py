"""End to end, as a careless user runs batchrun: no command changes a file batchrun did not write, two runs at
once never write an id twice, and a resume keeps the first run's errors file and its exit status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parent.parent / "sample_data"


def batchrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchrun", *args], capture_output=True, text=True, timeout=600)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(input, plan): 30 sample requests, the last line without a final newline."""
    tmp = tmp_path_factory.mktemp("job")
    input_path = tmp / "in.jsonl"
    input_path.write_text("\n".join((SAMPLE / "requests.jsonl").read_text().splitlines()[:30]))
    result = batchrun("plan", str(input_path), "-o", str(tmp / "job.plan"))
    assert result.returncode == 0, result.stderr
    return input_path, tmp / "job.plan"


def assert_refused(result: subprocess.CompletedProcess[str], match: str) -> None:
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1, result.stderr
    assert match in result.stderr, result.stderr


def test_run_never_writes_into_the_input_the_plan_or_a_foreign_file(job, tmp_path) -> None:
    input_path, plan_path = job
    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text('{"id": "x", "prompt": "mine"}')
    before = {p: p.read_bytes() for p in (input_path, plan_path, dataset)}
    for target, match in ((input_path, "is the plan's input"), (plan_path, "is the plan"),
                          (dataset, "not empty and has no")):
        assert_refused(batchrun("run", "--plan", str(plan_path), "-o", str(target)), match)
        assert_refused(batchrun("run", "--plan", str(plan_path), "-o", str(tmp_path / "o.jsonl"), "--errors",
                                str(target)), match if target != dataset else "no earlier run")
    assert {p: p.read_bytes() for p in before} == before


def test_plan_never_writes_over_its_input(tmp_path) -> None:
    input_path = tmp_path / "data.plan"  # a JSONL input named *.plan: the default target is the input itself
    text = (SAMPLE / "requests.jsonl").read_text().splitlines()[0] + "\n"
    input_path.write_text(text)
    for args in (("plan", str(input_path)), ("plan", str(input_path), "-o", str(input_path)),
                 ("plan", str(input_path), "-o", str(tmp_path))):
        result = batchrun(*args)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert input_path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["data.plan"]


def test_two_runs_at_once_write_every_id_once(job, tmp_path) -> None:
    input_path, plan_path = job
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "batchrun", "run", "--plan", str(plan_path), "-o", str(out), "--threads", "1"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0, results
    for rc, stderr in results:  # the other one either came after the first had finished, or was refused
        assert rc == 0 or (rc == 3 and "being written by another batchrun run (pid " in stderr), stderr
    ids = [r["id"] for r in lines(out)]
    assert len(ids) == 30 and len(set(ids)) == 30


def test_resume_keeps_the_errors_file_and_the_failed_status(tmp_path) -> None:
    plan_path, out, errors = tmp_path / "bad.plan", tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    assert batchrun("plan", str(SAMPLE / "bad_lines.jsonl"), "-o", str(plan_path)).returncode == 0
    first = batchrun("run", "--plan", str(plan_path), "-o", str(out), "--errors", str(errors))
    assert first.returncode == 1, first.stderr
    num_errors = len(lines(errors))
    again = batchrun("run", "--plan", str(plan_path), "-o", str(out), "--json")  # --errors left out
    assert again.returncode == 1, again.stderr  # the job still has failed requests
    assert json.loads(again.stdout.splitlines()[-1])["failed"] == 0
    assert len(lines(errors)) == num_errors and [r["id"] for r in lines(out)] == ["ok-1"]
    other = batchrun("run", "--plan", str(plan_path), "-o", str(out), "--errors", str(tmp_path / "e2.jsonl"))
    assert_refused(other, "wrote their error lines to")


def test_sigterm_during_run_is_handled_as_ctrl_c_and_resumes(job, tmp_path) -> None:
    _, plan_path = job
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "batchrun", "run", "--plan", str(plan_path), "-o", str(out), "--threads", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "interrupted: what was written is kept" in stderr, stderr
    assert "Traceback" not in stderr and 3 <= len(lines(out)) < 30
    result = batchrun("run", "--plan", str(plan_path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    ids = [r["id"] for r in lines(out)]
    assert len(ids) == 30 and len(set(ids)) == 30


def test_sigint_during_plan_is_one_message_and_leaves_no_file(tmp_path) -> None:
    input_path = tmp_path / "big.jsonl"
    rows = [json.loads(line) for line in (SAMPLE / "requests.jsonl").read_text().splitlines()]
    with input_path.open("w") as f:  # unique ids, so that all of them are tokenized: long enough to be mid-way
        for copy in range(200):
            f.writelines(json.dumps({**row, "id": f"{row['id']}-{copy}"}) + "\n" for row in rows)
    args = [sys.executable, "-m", "batchrun", "plan", str(input_path), "-o", str(tmp_path / "big.plan")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert stderr.strip().splitlines() == ["interrupted: what was written is kept; run the same command again to "
                                           "resume"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_bad_options_exit_2_in_one_line(tmp_path) -> None:
    input_path = tmp_path / "in.jsonl"
    input_path.write_text('{"prompt": "x"}\n')
    for option in (["--kv-budget", "1e400"], ["--dtype", "int8"]):
        result = batchrun("plan", str(input_path), *option)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
