"""The one-command job (`batchrun run INPUT -o OUT`): plan or input told apart by magic bytes, the plan kept
beside the output and reused, made again or refused when the job changed; standard input spooled to a file;
the command lines people type (vLLM's run-batch, `plan -`, `-i`) as subprocesses."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from batchrun.api import make_plan, planner_config, run_job
from batchrun.errors import UserError
from batchrun.job import is_plan_file, job_plan_path, job_source, spool_stdin

SAMPLE = Path(__file__).parent.parent / "sample_data"


def batchrun(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchrun", *args], capture_output=True, text=True, timeout=300,
                          input=stdin)


def small_input(tmp_path: Path, num_lines: int = 6, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((SAMPLE / "requests.jsonl").read_text().splitlines(keepends=True)[:num_lines]))
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), soft_wrap=True)


def ids(path: Path) -> list[str]:
    return sorted(json.loads(line)["id"] for line in path.read_text().splitlines())


def test_plan_or_input_by_magic_bytes_not_suffix(tmp_path: Path) -> None:
    made = make_plan(small_input(tmp_path), tmp_path / "job.jsonl")  # a plan, whatever its name says
    assert is_plan_file(made.path) and not is_plan_file(tmp_path / "in.jsonl")
    assert job_source(made.path, plan_path=None, input_path=None) == (made.path, None)
    assert job_source(tmp_path / "in.jsonl", plan_path=None, input_path=None) == (None, tmp_path / "in.jsonl")
    assert job_source(made.path, plan_path=None, input_path=Path("x")) == (made.path, Path("x"))
    with pytest.raises(UserError, match="two plans"):
        job_source(made.path, plan_path=made.path, input_path=None)
    with pytest.raises(UserError, match="two inputs"):
        job_source(tmp_path / "in.jsonl", plan_path=None, input_path=tmp_path / "in.jsonl")
    with pytest.raises(UserError, match="give what to run"):
        job_source(None, plan_path=None, input_path=None)
    with pytest.raises(UserError, match="no such file"):
        job_source(tmp_path / "absent", plan_path=None, input_path=None)


def test_one_command_job_plans_beside_the_output_and_resumes(tmp_path: Path) -> None:
    input_path, output = small_input(tmp_path), tmp_path / "out.jsonl"
    first = run_job(input_path, output, console=quiet(), threads=1)
    assert first.num_completed == 6 and job_plan_path(output).is_file()
    assert job_plan_path(output) == tmp_path / "out.jsonl.plan"
    plan_bytes = job_plan_path(output).read_bytes()
    again = run_job(None, output, input=input_path, console=quiet(), threads=1)
    assert again.num_resumed == 6 and again.num_completed == 0
    assert job_plan_path(output).read_bytes() == plan_bytes  # reused, not made again
    assert len(ids(output)) == 6


def test_changed_job_is_planned_again_before_results_and_refused_after(tmp_path: Path) -> None:
    input_path, output = small_input(tmp_path), tmp_path / "out.jsonl"
    make_plan(input_path, job_plan_path(output))  # a plan from an earlier command, nothing run from it
    console = quiet()
    outcome = run_job(input_path, output, config=planner_config(min_prefix_len=8), console=console, threads=1)
    assert outcome.num_completed == 6
    assert "the planning options changed" in console.file.getvalue()
    small_input(tmp_path, num_lines=4)  # the input changes under a finished output
    with pytest.raises(UserError, match="the input changed .* holds results"):
        run_job(input_path, output, config=planner_config(min_prefix_len=8), console=quiet())


def test_planning_options_with_a_plan_and_an_output_folder_are_refused(tmp_path: Path) -> None:
    made = make_plan(small_input(tmp_path), tmp_path / "job.plan")
    with pytest.raises(UserError, match="planning options"):
        run_job(made.path, tmp_path / "out.jsonl", config=planner_config(kv_budget="1GiB"), console=quiet())
    with pytest.raises(UserError, match=f"{tmp_path} is a directory"):
        run_job(made.path, tmp_path, console=quiet())


def test_spool_stdin_writes_the_whole_stream(tmp_path: Path) -> None:
    data = (SAMPLE / "requests.jsonl").read_bytes()
    target = spool_stdin(tmp_path / "new" / "in.jsonl", stream=io.BytesIO(data))
    assert target.read_bytes() == data and [p.name for p in target.parent.iterdir()] == ["in.jsonl"]


def test_vllm_run_batch_command_line_with_the_name_changed(tmp_path: Path) -> None:
    input_path, output = small_input(tmp_path), tmp_path / "out.jsonl"
    result = batchrun("run", "-i", str(input_path), "-o", str(output), "--model", "builtin-tiny", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert len(ids(output)) == 6
    assert "6 completed, 0 failed, 0 already done;" in result.stdout and f"→ {output}\n" in result.stdout  # one line
    # The plan positional, then with a moved job folder: the plan finds its input relative to itself.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("in.jsonl", "out.jsonl.plan"):
        shutil.move(tmp_path / name, moved / name)
    result = batchrun("run", str(moved / "out.jsonl.plan"), "-o", str(moved / "again.jsonl"), "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert ids(moved / "again.jsonl") == ids(output)


def test_plan_reads_standard_input_and_run_resumes_from_it(tmp_path: Path) -> None:
    target = tmp_path / "job.plan"
    result = batchrun("plan", "-", "-o", str(target), "--json", stdin=small_input(tmp_path).read_text())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "job.plan.input.jsonl").read_text() == (tmp_path / "in.jsonl").read_text()
    assert json.loads(result.stdout.splitlines()[-1])["requests"] == 6
    result = batchrun("run", "--plan", str(target), "-o", str(tmp_path / "out.jsonl"), "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert batchrun("plan", "-").returncode == 2  # no -o: nowhere to keep the input


def test_plan_command_line_mistakes(tmp_path: Path) -> None:
    input_path = small_input(tmp_path)
    made = batchrun("plan", "-i", str(input_path), "-o", str(tmp_path / "p.plan"))
    assert made.returncode == 0, made.stderr
    cases = {
        ("plan", str(input_path), "--show", str(tmp_path / "p.plan")): "not both",
        ("plan", str(input_path), "-o", str(tmp_path)): f"{tmp_path} is a directory",
        ("plan", str(input_path), "--kv-budget", "1KiB"): "no request fits the KV budget of 1.0 KiB",
    }
    for args, message in cases.items():
        result = batchrun(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "field 'prompt'" not in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and ".p.plan." not in result.stderr


def test_plan_records_its_input_relative_to_itself_and_run_input_overrides(tmp_path: Path) -> None:
    input_path = small_input(tmp_path / "data")
    made = make_plan(input_path, tmp_path / "jobs" / "job.plan")
    assert made.plan.header.input_path == "../data/in.jsonl"
    elsewhere = tmp_path / "elsewhere.jsonl"
    input_path.rename(elsewhere)
    with pytest.raises(UserError, match=r"plan's input .*data/in.jsonl is not there .* --input FILE"):
        run_job(made.path, tmp_path / "out.jsonl", console=quiet())
    outcome = run_job(made.path, tmp_path / "out.jsonl", input=elsewhere, console=quiet(), threads=1)
    assert outcome.num_completed == 6
    elsewhere.write_text(elsewhere.read_text()[:-1] + " \n")  # another file than the plan was made from
    with pytest.raises(UserError, match="has changed"):
        run_job(made.path, tmp_path / "out2.jsonl", input=elsewhere, console=quiet())
