"""claim.py and planfile.check_plan_target: no file that batchrun did not write is ever changed, a second run
on the same output is refused naming the holder, and resume re-uses the recorded errors file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchrun.claim import claim_output, exclusive_lock
from batchrun.errors import UserError
from batchrun.metrics import MetricsRecorder, metrics_path_for
from batchrun.planfile import MAGIC, check_plan_target

FP = "fp-this-plan"


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    files = {"plan": tmp_path / "job.plan", "input": tmp_path / "in.jsonl", "out": tmp_path / "out.jsonl"}
    files["plan"].write_bytes(MAGIC + b"rest")
    files["input"].write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}')
    return files


def claim(job: dict[str, Path], output: Path, errors: Path | None = None, fingerprint: str = FP):
    return claim_output(output, errors_path=errors, plan_path=job["plan"], input_path=job["input"],
                        plan_fingerprint=fingerprint)


def record_run(output: Path, *, fingerprint: str = FP, errors: Path | None = None) -> None:
    info = {"plan_fingerprint": fingerprint, "errors_path": str(errors.resolve()) if errors else None}
    with MetricsRecorder(metrics_path_for(output), run_info=info):
        pass


def refused(job: dict[str, Path], output: Path, errors: Path | None = None, *, match: str,
            fingerprint: str = FP) -> None:
    before = {p: p.read_bytes() for p in job["plan"].parent.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=match), claim(job, output, errors, fingerprint):
        pass
    assert {p: p.read_bytes() for p in before} == before  # not a byte changed


def test_the_plan_its_input_and_links_to_them_are_refused(job, tmp_path) -> None:
    refused(job, job["plan"], match="is the plan")
    refused(job, job["input"], match="is the plan's input")
    (tmp_path / "link.jsonl").symlink_to(job["input"])
    refused(job, tmp_path / "link.jsonl", match="is the plan's input")
    os.link(job["plan"], tmp_path / "hard.plan")
    refused(job, tmp_path / "hard.plan", match="is the plan")
    refused(job, job["out"], job["input"], match="is the plan's input")
    refused(job, job["out"], job["out"], match="is the output file")
    refused(job, job["out"], metrics_path_for(job["out"]), match="metrics file")
    refused(job, Path("/dev/null"), match="not a regular file")


def test_a_file_batchrun_did_not_write_is_never_touched(job, tmp_path) -> None:
    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text('{"a": 1}\n{"a": 2}')  # no final newline: a "torn tail" to a careless repair
    refused(job, dataset, match="not empty and has no")
    table = tmp_path / "table.csv"
    table.write_text("a,b")
    refused(job, table, match="not empty and has no")
    refused(job, job["out"], dataset, match="no earlier run")


def test_another_plans_output_is_refused(job) -> None:
    job["out"].write_text('{"id": "a", "text": "", "token_ids": [], "finish_reason": "stop"}\n')
    record_run(job["out"], fingerprint="fp-other-plan")
    refused(job, job["out"], match="another plan")
    metrics_path_for(job["out"]).unlink()  # the record removed: the lines alone prove nothing
    refused(job, job["out"], match="not empty and has no")


def test_a_new_or_own_output_is_claimed_and_the_errors_file_recorded_is_reused(job, tmp_path) -> None:
    errors = tmp_path / "errors.jsonl"
    with claim(job, job["out"], errors) as claimed:
        assert claimed.errors_path == errors and job["out"].read_bytes() == b""
    record_run(job["out"], errors=errors)
    errors.write_text('{"id": "b", "line": 2, "error": {"code": "x", "message": "y"}}\n')
    with claim(job, job["out"]) as claimed:  # --errors left out on resume: the first run's file
        assert claimed.errors_path == errors.resolve()
    refused(job, job["out"], tmp_path / "other-errors.jsonl", match="wrote their error lines to")


def test_a_second_claim_is_refused_naming_the_holder(job) -> None:
    with claim(job, job["out"]):
        with pytest.raises(UserError, match=f"another batchrun run \\(pid {os.getpid()}\\)"), \
                claim(job, job["out"]):
            pass
    with claim(job, job["out"]):  # released with the first
        pass


def test_the_errors_file_is_locked_too(job, tmp_path) -> None:
    errors = tmp_path / "errors.jsonl"
    with exclusive_lock(errors), pytest.raises(UserError, match="being written by another"), \
            claim(job, job["out"], errors):
        pass


def test_plan_never_writes_over_its_input_or_a_foreign_file(job, tmp_path) -> None:
    with pytest.raises(UserError, match="is the input file"):
        check_plan_target(job["input"], input_path=job["input"])
    named_plan = tmp_path / "data.plan"  # a JSONL input whose name ends in .plan: the default target
    named_plan.write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match="is the input file"):
        check_plan_target(named_plan.with_suffix(".plan"), input_path=named_plan)
    with pytest.raises(UserError, match="is a folder"):
        check_plan_target(tmp_path, input_path=job["input"])
    with pytest.raises(UserError, match="not a batchrun plan"):
        check_plan_target(_foreign(tmp_path), input_path=job["input"])
    check_plan_target(job["plan"], input_path=job["input"])  # an old plan may be replaced
    check_plan_target(tmp_path / "new.plan", input_path=job["input"])


def _foreign(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    return path
