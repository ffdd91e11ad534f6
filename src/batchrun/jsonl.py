"""JSONL files that are appended to while a run goes and read back after it: streaming reads that forgive a
torn last line, its repair before appending again, and the append-mode open and write.

A killed process leaves at most one torn line at the end of a file (each line goes out in one write call).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from batchrun.errors import UserError

_TAIL_CHUNK = 1 << 16


def open_append(path: str | os.PathLike[str]) -> int:
    """A file descriptor appending to `path` (created, with its folder, if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def write_all(fd: int, data: bytes, *, path: str | os.PathLike[str]) -> None:
    """Writes `data` in one write call where the OS allows: with O_APPEND it lands at the end in one piece, and
    a kill can only leave a prefix of it, which repair_torn_tail cuts away. The loop covers a short write
    (disk full, signal). An OSError (disk full) names `path`, the file written."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def iter_jsonl(path: str | os.PathLike[str], *, allow_torn_tail: bool = True) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each line, streaming; blank lines are skipped.

    A line that is not a JSON object raises UserError naming the file and line, except, with
    `allow_torn_tail`, the last line when it is torn (no newline, or not JSON): a kill mid-write leaves one.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        pending: tuple[int, str] | None = None  # a bad line, forgiven only if it turns out to be the last
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if pending is not None:
                raise UserError(f"{path}:{pending[0]}: {pending[1]}")
            problem = None if raw.endswith(b"\n") else "torn line (no newline at its end)"
            obj: Any = None
            if problem is None:
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError as e:
                    problem = f"not valid JSON ({e})"
            if problem is None and not isinstance(obj, dict):
                raise UserError(f"{path}:{line_no}: not a JSON object")
            if problem is not None:
                pending = (line_no, problem)
                continue
            yield line_no, obj
        if pending is not None and not allow_torn_tail:
            raise UserError(f"{path}:{pending[0]}: {pending[1]}")


def repair_torn_tail(path: str | os.PathLike[str]) -> int:
    """Cuts away a torn last line (no newline at its end, or not valid JSON); returns the bytes removed.

    Reads only the tail of the file, so opening a large output to resume stays cheap.
    """
    path = Path(path)
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        end = _rfind_newline(f, size) + 1  # just past the last newline; 0 when there is none
        start = _rfind_newline(f, end - 1) + 1 if end > 0 else 0  # the last complete line is [start, end)
        cut = end
        if end > start:
            f.seek(start)
            last = f.read(end - start)
            if last.strip():
                try:
                    orjson.loads(last)
                except orjson.JSONDecodeError:
                    cut = start
        if cut < size:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        return size - cut


def _rfind_newline(f: Any, before: int) -> int:
    """Offset of the last b"\\n" at an offset < `before`, or -1."""
    pos = before
    while pos > 0:
        lo = max(0, pos - _TAIL_CHUNK)
        f.seek(lo)
        i = f.read(pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i
        pos = lo
    return -1
