"""The files a run writes, claimed before anything is opened for writing: paths that name the plan, its input
or the other output file are refused, each file is locked exclusively (a second run is refused, naming the
holder), and a file that already has bytes must be proven to be this plan's output before it is touched.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

from batchrun.errors import UserError
from batchrun.metrics import metrics_path_for
from batchrun.plan_checks import check_same_plan


class ClaimedOutput(NamedTuple):
    output: Path
    errors_path: Path | None  # as given, or the one recorded by earlier runs of this output


@contextmanager
def claim_output(output: Path, *, errors_path: Path | None, plan_path: Path, input_path: Path,
                 plan_fingerprint: str, default_errors_path: Path | None = None) -> Iterator[ClaimedOutput]:
    """Holds the output (and errors) files for the run inside the `with`; UserError when they cannot be
    this plan's output. Without `errors_path`, earlier runs' errors file (recorded in the metrics) is used, and
    `default_errors_path` for a new output (None: error lines go into the output)."""
    refuse_foreign_paths(output, errors_path, plan_path=plan_path, input_path=input_path)
    with ExitStack() as stack:
        stack.enter_context(exclusive_lock(output))
        recorded = check_same_plan(output, plan_fingerprint)
        errors_path = _errors_path(output, given=errors_path, recorded=recorded)
        if errors_path is None and not _has_bytes(output):  # a new job: where its error lines go is ours to say
            errors_path = default_errors_path
        if errors_path is not None:
            refuse_foreign_paths(output, errors_path, plan_path=plan_path, input_path=input_path)
            stack.enter_context(exclusive_lock(errors_path))
            if recorded is None and _has_bytes(errors_path):
                raise UserError(f"{errors_path} is not empty and no earlier run of {output} wrote it: choose "
                                "another --errors file (batchrun never changes a file it did not write)")
        yield ClaimedOutput(output, errors_path)


def refuse_foreign_paths(output: Path, errors_path: Path | None, *, plan_path: Path, input_path: Path) -> None:
    """Refuses an output or errors path that is (or links to) the plan, its input, the other file, or a
    metrics file, or that exists and is not a regular file: checked before anything is opened for writing."""
    others = {"the plan": plan_path, "the plan's input": input_path}
    targets = [("--output", output)] + ([("--errors", errors_path)] if errors_path is not None else [])
    for option, path in targets:
        if path.exists() and not path.is_file():
            raise UserError(f"{option} {path}: not a regular file")
        if str(path).endswith(".metrics.jsonl"):
            raise UserError(f"{option} {path}: a metrics file is written beside the output, not chosen")
        for what, other in others.items():
            if _is_same_file(path, other):
                raise UserError(f"{option} {path} is {what} ({other}): choose another file")
    if errors_path is not None and (_is_same_file(errors_path, output)
                                    or _is_same_file(errors_path, metrics_path_for(output))):
        raise UserError(f"--errors {errors_path} is the output file: leave --errors out to write error lines "
                        "into the output")


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created empty if missing) for the `with`; UserError naming the process
    that holds it. A killed process's lock goes with it, so a stale lock never blocks a resume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # read-only: locking writes nothing
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(os.fstat(fd))
            raise UserError(f"{path} is being written by another batchrun run ({holder}); wait for it to "
                            "finish, or stop it and run again to resume") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _errors_path(output: Path, *, given: Path | None, recorded: str | None) -> Path | None:
    if recorded is None:
        return given
    if given is None:
        return Path(recorded)
    if not _is_same_file(given, Path(recorded)):
        raise UserError(f"earlier runs of {output} wrote their error lines to {recorded}: give --errors "
                        f"{recorded} (or leave --errors out) to resume")
    return given


def _is_same_file(a: Path, b: Path) -> bool:
    """The same file, through links (symbolic or hard) too; a missing file is the same only by path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _has_bytes(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _lock_holder(st: os.stat_result) -> str:
    """'pid N' from /proc/locks (Linux), where the kernel lists every flock with its owner and inode."""
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
                    return f"pid {fields[4]}"
    except OSError:
        pass  # no /proc (not Linux): the message goes without the pid
    return "pid unknown"
