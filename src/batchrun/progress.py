"""Progress of a run, seen through the results it writes: a rich bar on a terminal, plain lines in a log.

`ProgressWriter` stands between the engine and the OutputWriter, so the engine knows nothing of display.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from batchrun.output import Completion, OutputWriter
from batchrun.requests import InvalidLine, Request


class ProgressWriter:
    """Forwards every result to `writer` and counts it: requests done, failures, output tokens per second."""

    def __init__(self, writer: OutputWriter, *, total: int, num_done: int, console: Console,
                 interval_s: float) -> None:
        self.writer = writer
        self.total, self.num_done, self.num_failed, self.output_tokens = total, num_done, 0, 0
        self.console, self.interval_s = console, interval_s
        self.start = self.last_print = time.perf_counter()
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressWriter:
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]run"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task("run", total=self.total, completed=self.num_done, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._print_line()

    def write_completion(self, request: Request, completion: Completion) -> None:
        self.writer.write_completion(request, completion)
        self.output_tokens += completion.completion_tokens
        self._advance()

    def write_error(self, record: Request | InvalidLine, *, code: str | None = None,
                    message: str | None = None) -> None:
        self.writer.write_error(record, code=code, message=message)
        self.num_failed += 1
        self._advance()

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / max(1e-9, time.perf_counter() - self.start)

    def _advance(self) -> None:
        self.num_done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.num_done, rate=f"{self.output_tokens_per_s:,.0f} tok/s")
        elif time.perf_counter() - self.last_print >= self.interval_s:
            self._print_line()

    def _print_line(self) -> None:
        self.last_print = now = time.perf_counter()
        rate = self.num_done / max(1e-9, now - self.start)
        eta = (self.total - self.num_done) / rate if rate > 0 else float("inf")
        self.console.print(
            f"progress: {self.num_done}/{self.total} requests ({self.num_failed} failed), "
            f"{self.output_tokens_per_s:,.1f} output tok/s, elapsed {now - self.start:,.0f}s, eta {eta:,.0f}s",
            highlight=False, soft_wrap=True,
        )
