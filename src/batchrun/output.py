"""The results file: one JSONL line per finished request (plain or OpenAI batch format), error lines, resume.

Owns the plain output format (openai_format.py has OpenAI's), the separate errors file, gathering the n samples
of a request into one line, input order (`set_order`), and resume (what is done; jsonl.py repairs a torn last
line after a kill).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from batchrun import openai_format
from batchrun.completion import Completion, FinishReason, TokenChoice, TokenLogprob
from batchrun.errors import UserError
from batchrun.jsonl import iter_jsonl, open_append, repair_torn_tail, write_all
from batchrun.requests import InvalidLine, Request

__all__ = ["Completion", "FinishReason", "OutputWriter", "TokenChoice", "TokenLogprob", "default_errors_path"]

# Every line is flushed to the OS as it is written, so a killed process (kill -9, OOM) loses at most the line
# being written, and resume repairs that. fsync only protects against a power loss or an OS crash; doing it
# per line would cost a disk round trip per request (milliseconds, more than a short request's decode), so it
# is done at most every FSYNC_INTERVAL_S and at close: a crash of the machine loses a few seconds of work.
FSYNC_INTERVAL_S = 5.0
# A duplicate_id error line carries the id of another (valid) record: that id is not done by it.
_FOREIGN_ID_CODES = frozenset({"duplicate_id"})


class OutputWriter:
    """Appends result lines to `path` (error lines to `errors_path` when given), resuming what is there.

    Opening reads the existing files (streaming), cuts a torn last line away, and records what is done;
    `is_done(record)` tells the caller what to skip. Completed lines are never rewritten. `model_name` and
    `system_fingerprint` are the model that runs, named in OpenAI bodies.
    """

    def __init__(self, path: str | os.PathLike[str], *, errors_path: str | os.PathLike[str] | None = None,
                 model_name: str | None = None, system_fingerprint: str | None = None) -> None:
        self.path = Path(path)
        self.errors_path = Path(errors_path) if errors_path is not None else None
        if self.errors_path is not None and _same_file(self.errors_path, self.path):
            self.errors_path = None
        self.model_name = model_name
        self.system_fingerprint = system_fingerprint
        self._samples: dict[int, dict[int, Completion]] = {}  # input line → the samples finished so far
        self._order: list[int] | None = None  # with set_order: the input lines still to write, in reverse
        self._held: dict[int, tuple[Path, bytes]] = {}  # with set_order: lines written ahead of their turn
        self._success_ids: set[str] = set()
        self._error_ids: set[str] = set()
        self._error_lines: set[int] = set()
        self.num_resumed = 0  # lines found on open
        self.num_written = 0  # lines written by this writer
        self.num_torn_bytes = 0  # bytes cut away on open (a torn last line)
        self._fds: dict[Path, int] = {}
        self._last_fsync = time.monotonic()
        for p in (self.path, self.errors_path):
            if p is not None:
                self._resume(p)
                self._fds[p] = open_append(p)

    # --- resume -----------------------------------------------------------------------------------------

    def _resume(self, path: Path) -> None:
        # Every line is read as an output line before the torn tail is cut: a file that is not batchrun
        # output is refused (UserError) before a byte of it changes.
        for line_no, obj in iter_jsonl(path, allow_torn_tail=True):
            self._note(obj, where=f"{path}:{line_no}")
            self.num_resumed += 1
        self.num_torn_bytes += repair_torn_tail(path)

    def _note(self, obj: dict[str, Any], *, where: str) -> None:
        error = openai_format.error_of(obj) if "custom_id" in obj else obj.get("error")
        rid = obj["custom_id"] if "custom_id" in obj else obj.get("id")
        if rid is not None and not isinstance(rid, str):
            raise UserError(f"{where}: not a batchrun output line (the id is not a string)")
        if error is None:
            if rid is None:
                raise UserError(f"{where}: not a batchrun output line (no id and no error)")
            self._success_ids.add(rid)
            return
        line = obj.get("line")
        if not isinstance(line, int) or not isinstance(error, dict):
            raise UserError(f"{where}: not a batchrun error line (it needs an integer 'line' and an 'error')")
        self._error_lines.add(line)
        if rid is not None and error.get("code") not in _FOREIGN_ID_CODES:
            self._error_ids.add(rid)

    def done_ids(self) -> set[str]:
        """Ids (plain "id", OpenAI "custom_id") already written, as a success or an error."""
        return self._success_ids | self._error_ids

    def done_lines(self) -> set[int]:
        """Input line numbers of every error line written (invalid records, with or without an id, and
        requests that failed at run time: error lines always carry their input line)."""
        return set(self._error_lines)

    def is_done(self, record: Request | InvalidLine) -> bool:
        """Whether a record already has its line: the exact test for skipping on resume.

        A request is done by a success line with its id or an error line with its input line; an invalid
        record only by its input line (its id may belong to another record, e.g. a duplicate id).
        """
        if isinstance(record, InvalidLine):
            return record.line in self._error_lines
        return record.id in self._success_ids or record.line in self._error_lines

    # --- writing ----------------------------------------------------------------------------------------

    def set_order(self, records: Iterable[Request | InvalidLine]) -> None:
        """Writes lines in the input order of `records` (every record of the plan) from now on: a line that
        finishes before an earlier one is held until that one is written. Call it before writing."""
        assert self.num_written == 0 and not self._held, "set_order comes before any line is written"
        self._order = sorted({r.line for r in records if not self.is_done(r)}, reverse=True)

    def write_completion(self, request: Request, completion: Completion) -> bool:
        """One finished sample; returns whether this completed the request's line (its last sample). A sample
        of a request that already failed is dropped (its error line stands for the whole request)."""
        if request.num_samples > 1:
            if request.line in self._error_lines:
                return False
            samples = self._samples.setdefault(request.line, {})
            assert request.sample_index not in samples, f"sample {request.sample_index} of {request.id!r} twice"
            samples[request.sample_index] = completion
            if len(samples) < request.num_samples:
                return False
            choices = [samples[i] for i in range(request.num_samples)]
            del self._samples[request.line]
        else:
            choices = [completion]
        assert not self.is_done(request), f"request {request.id!r} (line {request.line}) written twice"
        if request.format == "openai":
            obj = openai_format.success_line(request, choices, model=self.model_name,
                                             system_fingerprint=self.system_fingerprint)
        else:
            obj = _plain_success(request, choices)
        self._write(self.path, obj, line=request.line)
        self._success_ids.add(request.id)
        return True

    def write_error(self, record: Request | InvalidLine, *, code: str | None = None,
                    message: str | None = None) -> bool:
        """An error line: for an InvalidLine (its own code and message), or for a Request that failed at
        run time (`code` and `message` required). Returns whether a line was written: a second failing sample
        of one request adds none."""
        if isinstance(record, InvalidLine):
            assert code is None and message is None, "an InvalidLine carries its own code and message"
            code, message, param = record.code, record.message, record.param
        else:
            param = None
            if record.num_samples > 1:
                if record.line in self._error_lines:
                    return False
                self._samples.pop(record.line, None)
        assert code and message is not None, "a run-time error needs a code and a message"
        assert record.line not in self._error_lines, f"line {record.line} has an error line already"
        if record.format == "openai":
            obj = openai_format.error_line(custom_id=record.id, line=record.line, code=code, message=message,
                                           param=param)
        else:
            obj = {"id": record.id, "line": record.line, "error": {"code": code, "message": message}}
        self._write(self.errors_path or self.path, obj, line=record.line)
        self._error_lines.add(record.line)
        if record.id is not None and code not in _FOREIGN_ID_CODES:
            self._error_ids.add(record.id)
        return True

    def _write(self, path: Path, obj: dict[str, Any], *, line: int) -> None:
        data = orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        if self._order is None:
            self._append(path, data)
            return
        # Input order: held lines wait for the earlier ones; a run that stops holds them unwritten (resume
        # computes them again), so the files always hold a prefix of the input order.
        self._held[line] = (path, data)
        while self._order and self._order[-1] in self._held:
            self._append(*self._held.pop(self._order.pop()))

    def _append(self, path: Path, data: bytes) -> None:
        fd = self._fds.get(path)
        assert fd is not None, "the writer is closed"
        write_all(fd, data, path=path)  # the whole line in one write call
        self.num_written += 1
        now = time.monotonic()
        if now - self._last_fsync >= FSYNC_INTERVAL_S:
            self._fsync_all()
            self._last_fsync = now

    def _fsync_all(self) -> None:
        for path, fd in self._fds.items():
            try:
                os.fsync(fd)
            except OSError as e:  # a full disk can show here first: name the file
                raise OSError(e.errno, e.strerror, str(path)) from None

    def close(self) -> None:
        if not self._fds:
            return
        self._fsync_all()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def default_errors_path(output: Path) -> Path:
    """Where an OpenAI-format run writes its error file unless told: beside the output, OUT.errors.jsonl."""
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


def _plain_success(request: Request, choices: list[Completion]) -> dict[str, Any]:
    """Plain format: the completion's fields at the top level; with n > 1, a `choices` list of them."""
    fields = [_plain_fields(c) for c in choices]
    usage = {"prompt_tokens": choices[0].prompt_tokens,
             "completion_tokens": sum(c.completion_tokens for c in choices)}
    if len(choices) == 1:
        return {"id": request.id, **fields[0], "usage": usage}
    return {"id": request.id, "choices": [{"index": i, **f} for i, f in enumerate(fields)], "usage": usage}


def _plain_fields(c: Completion) -> dict[str, Any]:
    fields: dict[str, Any] = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        fields["logprobs"] = openai_format.chat_logprobs(c.logprobs)["content"]
    return fields


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()
