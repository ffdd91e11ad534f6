"""A job as `batchrun run` starts it: from a plan file or from an input JSONL (told apart by the plan's magic
bytes, not the suffix), and, for an input, the plan kept beside the output so that the same command resumes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from batchrun.errors import EXIT_USAGE, UserError
from batchrun.metrics import metrics_path_for
from batchrun.model.spec import ModelSpec
from batchrun.planfile import MAGIC, load_plan_header
from batchrun.planner import PlannerConfig
from batchrun.requests import file_fingerprint

STDIN = "-"


class JobSource(NamedTuple):
    """What a run starts from: a plan (`input_path` then overrides the plan's input), or an input alone."""

    plan_path: Path | None
    input_path: Path | None


def is_plan_file(path: Path) -> bool:
    """True when `path` starts with the plan file's magic bytes; UserError when it cannot be read."""
    try:
        with path.open("rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a plan or an input JSONL file") from None


def job_source(source: Path | None, *, plan_path: Path | None, input_path: Path | None) -> JobSource:
    """Sorts the positional SOURCE (a plan or an input) and the --plan / --input options into a JobSource."""
    if source is not None:
        is_plan = str(source) != STDIN and is_plan_file(source)
        taken = plan_path if is_plan else input_path
        if taken is not None:
            kind, option = ("plan", "--plan") if is_plan else ("input", "--input")
            raise UserError(f"two {kind}s given: {source} and {option} {taken}; give one", exit_code=EXIT_USAGE)
        plan_path, input_path = (source, input_path) if is_plan else (plan_path, source)
    if plan_path is None and input_path is None:
        raise UserError("give what to run: a plan (`batchrun run PLAN -o OUT`) or an input JSONL "
                        "(`batchrun run INPUT.jsonl -o OUT` plans it first)", exit_code=EXIT_USAGE)
    return JobSource(plan_path, input_path)


def job_plan_path(output: Path) -> Path:
    """Where a one-command job keeps its plan: beside the output, OUT.jsonl.plan."""
    return output.with_name(output.name + ".plan")


def spool_stdin(target: Path, *, stream: BinaryIO | None = None) -> Path:
    """Copies standard input to `target` (written whole, then renamed into place) and returns it: a plan
    made from it keeps the input's fingerprint, and `run` checks and resumes against this file."""
    stream = stream or sys.stdin.buffer
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            while chunk := stream.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def stale_reasons(plan_path: Path, *, input_path: Path, spec: ModelSpec, config: PlannerConfig) -> list[str]:
    """What differs between the plan at `plan_path` and the job asked for now (empty: the plan still fits)."""
    header = load_plan_header(plan_path)
    reasons = []
    if header.input_fingerprint != file_fingerprint(input_path):
        reasons.append("the input")
    if header.model_fingerprint != spec.fingerprint:
        reasons.append("the model")
    if header.params != config:
        reasons.append("the planning options")
    return reasons


def has_results(output: Path) -> bool:
    """True when a run already wrote into `output` (results, or the metrics file of a run)."""
    return (output.is_file() and output.stat().st_size > 0) or metrics_path_for(output).is_file()


def ensure_job_plan(input_path: Path, output: Path, *, spec: ModelSpec, config: PlannerConfig,
                    make_plan: Callable[[Path], object], note: Callable[[str], None]) -> Path:
    """The plan of the job `input_path` → `output`, beside the output: reused when it matches the input, the
    model and the planning options; made again when it does not and nothing was run from it yet; refused
    (UserError) when the output already holds results of the old plan. `make_plan(target)` writes a plan."""
    plan_path = job_plan_path(output)
    if plan_path.is_file():
        reasons = stale_reasons(plan_path, input_path=input_path, spec=spec, config=config)
        if not reasons:
            return plan_path
        changed = " and ".join(reasons)
        if has_results(output):
            raise UserError(f"{changed} changed since {plan_path} was made, and {output} holds results of that "
                            f"plan: write to another output, or remove {output} (with its .plan and "
                            ".metrics.jsonl files) to start again")
        note(f"{changed} changed since {plan_path} was made: planning again")
    make_plan(plan_path)
    return plan_path
