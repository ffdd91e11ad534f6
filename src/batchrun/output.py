"""The results file: one JSONL line per finished request (plain or OpenAI batch format), error lines, resume.

Owns the output formats, the optional separate errors file, and resume (what is done; jsonl.py repairs a torn
last line after a kill).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import orjson

from batchrun.errors import UserError
from batchrun.jsonl import iter_jsonl, open_append, repair_torn_tail, write_all
from batchrun.requests import InvalidLine, Request

FinishReason = Literal["stop", "length"]

# Every line is flushed to the OS as it is written, so a killed process (kill -9, OOM) loses at most the line
# being written, and resume repairs that. fsync only protects against a power loss or an OS crash; doing it
# per line would cost a disk round trip per request (milliseconds, more than a short request's decode), so it
# is done at most every FSYNC_INTERVAL_S and at close: a crash of the machine loses a few seconds of work.
FSYNC_INTERVAL_S = 5.0
# A duplicate_id error line carries the id of another (valid) record: that id is not done by it.
_FOREIGN_ID_CODES = frozenset({"duplicate_id"})


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int

    def __post_init__(self) -> None:
        assert self.finish_reason in ("stop", "length"), self.finish_reason
        assert self.prompt_tokens > 0, self.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class OutputWriter:
    """Appends result lines to `path` (error lines to `errors_path` when given), resuming what is there.

    Opening reads the existing files (streaming), cuts a torn last line away, and records what is done;
    `is_done(record)` tells the caller what to skip. Completed lines are never rewritten.
    """

    def __init__(self, path: str | os.PathLike[str], *, errors_path: str | os.PathLike[str] | None = None,
                 model_name: str | None = None) -> None:
        self.path = Path(path)
        self.errors_path = Path(errors_path) if errors_path is not None else None
        if self.errors_path is not None and _same_file(self.errors_path, self.path):
            self.errors_path = None
        self.model_name = model_name  # for OpenAI bodies whose request named no model
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
        error = obj.get("error")
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

    def write_completion(self, request: Request, completion: Completion) -> None:
        assert not self.is_done(request), f"request {request.id!r} (line {request.line}) written twice"
        if request.format == "openai":
            obj = self._openai_success(request, completion)
        else:
            obj = {
                "id": request.id,
                "text": completion.text,
                "token_ids": completion.token_ids,
                "finish_reason": completion.finish_reason,
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                },
            }
        self._write(self.path, obj)
        self._success_ids.add(request.id)

    def write_error(self, record: Request | InvalidLine, *, code: str | None = None,
                    message: str | None = None) -> None:
        """An error line: for an InvalidLine (its own code and message), or for a Request that failed at
        run time (`code` and `message` required)."""
        if isinstance(record, InvalidLine):
            assert code is None and message is None, "an InvalidLine carries its own code and message"
            code, message = record.code, record.message
        assert code and message is not None, "a run-time error needs a code and a message"
        assert record.line not in self._error_lines, f"line {record.line} has an error line already"
        error = {"code": code, "message": message}
        if record.format == "openai":
            obj = {"id": _batch_req_id(), "custom_id": record.id, "line": record.line, "response": None,
                   "error": error}
        else:
            obj = {"id": record.id, "line": record.line, "error": error}
        self._write(self.errors_path or self.path, obj)
        self._error_lines.add(record.line)
        if record.id is not None and code not in _FOREIGN_ID_CODES:
            self._error_ids.add(record.id)

    def _openai_success(self, request: Request, completion: Completion) -> dict[str, Any]:
        created = int(time.time())
        usage = {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        }
        model = request.model or self.model_name
        suffix = uuid.uuid4().hex
        if request.endpoint == "chat":
            body = {
                "id": f"chatcmpl-{suffix}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "finish_reason": completion.finish_reason}],
                "usage": usage,
            }
        else:
            body = {
                "id": f"cmpl-{suffix}", "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": completion.text, "index": 0, "logprobs": None,
                             "finish_reason": completion.finish_reason}],
                "usage": usage,
            }
        return {
            "id": _batch_req_id(),
            "custom_id": request.id,
            "response": {"status_code": 200, "request_id": f"req_{suffix}", "body": body},
            "error": None,
        }

    def _write(self, path: Path, obj: dict[str, Any]) -> None:
        fd = self._fds.get(path)
        assert fd is not None, "the writer is closed"
        write_all(fd, orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE), path=path)  # the line in one call
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


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _batch_req_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"
