"""Tears down the local Ray cluster a driver started when the driver dies without shutting it down (kill -9,
OOM): a small process in its own session holds a pipe from the driver and keeps the list of the driver's
descendants (Linux /proc) fresh; when the pipe closes without the driver's "done", it kills them all.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

DONE = b"done"
POLL_S = 0.5  # how often the descendants are listed: a process started and orphaned faster is missed


class Watchdog:
    """Watches this process: `release()` before a clean shutdown; if this process dies first, the watchdog
    kills every process this one had started (Ray's, and what they started)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "batchrun.distributed.watchdog", str(os.getpid())],
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
    driver = int(argv[0])
    known: set[int] = set()
    message = b""
    while True:
        # The driver's descendants are listed while it lives: once it dies they are orphans, not found by it.
        known |= set(descendants([driver])) - {driver, os.getpid()}
        if select.select([sys.stdin], [], [], POLL_S)[0]:
            chunk = os.read(sys.stdin.fileno(), 64)
            if chunk:
                message += chunk
                continue
            break  # the pipe closed: the driver is gone, or done
    if message == DONE:
        return
    for pid in descendants(sorted(known)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone


if __name__ == "__main__":
    main(sys.argv[1:])
