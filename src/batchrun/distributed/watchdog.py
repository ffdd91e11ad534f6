"""Tears down the local Ray cluster a driver started when the driver dies without shutting it down (kill -9,
OOM): a small process in its own session holds a pipe from the driver, and when the pipe closes without the
driver's "done" it kills the Ray processes the driver started, and every process they started (Linux /proc).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

DONE = b"done"


class Watchdog:
    """Watches this process on behalf of `pids` (the Ray processes it started): `release()` before a clean
    shutdown; if this process dies first, the watchdog kills `pids` and their descendants."""

    def __init__(self, pids: list[int]) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "batchrun.distributed.watchdog", *map(str, pids)],
                                      stdin=subprocess.PIPE, start_new_session=True)

    def release(self) -> None:
        """The driver shuts Ray down itself: the watchdog exits without killing anything."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(DONE)
        self._proc.stdin.close()
        self._proc.wait()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (empty where there is no /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the command name (field 2) is in parentheses and may hold spaces: fields after its ")" are fixed
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # a process that ended while the folder was read
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def descendants(pids: list[int]) -> list[int]:
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += child_pids(pid)
    return found


def main(argv: list[str]) -> None:
    message = sys.stdin.buffer.read()  # returns when the driver writes "done" and closes, or dies
    if message == DONE:
        return
    for pid in descendants([int(a) for a in argv]):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone


if __name__ == "__main__":
    main(sys.argv[1:])
