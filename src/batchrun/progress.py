"""Progress of a run, seen through the results it writes and the tokens each step generates: a rich bar on a
terminal, plain lines in a log.

`ProgressWriter` stands between the engine and the OutputWriter, so the engine knows nothing of display. The
ETA counts tokens, not finished requests: the requests of a batch finish together, so a count of finished
requests stays near zero for most of a run and extrapolates to absurd times.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from batchrun.output import Completion, OutputWriter
from batchrun.requests import InvalidLine, Request


class ProgressWriter:
    """Forwards every result to `writer` and counts it: requests done, failures, output tokens per second.

    `total_tokens` is the decode work left: the sum of max_tokens of the requests this run computes. A request
    that finishes early gives back what it did not use, so the work done reaches the total at the end.
    """

    def __init__(self, writer: OutputWriter, *, total: int, num_done: int, console: Console,
                 interval_s: float, total_tokens: int = 0) -> None:
        self.writer = writer
        self.total, self.num_done, self.num_failed, self.output_tokens = total, num_done, 0, 0
        self.total_tokens, self.stepped_tokens, self.unused_tokens = total_tokens, 0, 0
        self.console, self.interval_s = console, interval_s
        self.start = self.last_print = time.perf_counter()
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressWriter:
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]run"), BarColumn(), TextColumn("{task.fields[requests]}"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task("run", total=max(1, self.total_tokens), completed=0,
                                            requests=self._requests_text(), rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._print_line()

    def write_completion(self, request: Request, completion: Completion) -> None:
        self.writer.write_completion(request, completion)
        self.output_tokens += completion.completion_tokens
        self.unused_tokens += request.sampling.max_tokens - completion.completion_tokens
        self._advance()

    def write_error(self, record: Request | InvalidLine, *, code: str | None = None,
                    message: str | None = None) -> None:
        self.writer.write_error(record, code=code, message=message)
        self.num_failed += 1
        if isinstance(record, Request):
            self.unused_tokens += record.sampling.max_tokens
        self._advance()

    def count_step(self, *, num_decode_tokens: int) -> None:
        """Tokens a step generated for requests still running (results report them only at the end)."""
        self.stepped_tokens += num_decode_tokens
        self._refresh()

    @property
    def done_tokens(self) -> int:
        """Decode work done: tokens generated (seen per step, or per result when steps are not seen) plus the
        max_tokens that finished requests did not use."""
        return min(self.total_tokens, self.unused_tokens + max(self.stepped_tokens, self.output_tokens))

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / max(1e-9, time.perf_counter() - self.start)

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate of work so far; None before any work is done (nothing to go by)."""
        done = self.done_tokens
        if done >= self.total_tokens:
            return 0.0
        if done <= 0:
            return None
        return (self.total_tokens - done) * (time.perf_counter() - self.start) / done

    def _requests_text(self) -> str:
        return f"{self.num_done}/{self.total} requests"

    def _advance(self) -> None:
        self.num_done += 1
        self._refresh()

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done_tokens, requests=self._requests_text(),
                             rate=f"{self.output_tokens_per_s:,.0f} tok/s")
        elif time.perf_counter() - self.last_print >= self.interval_s:
            self._print_line()

    def _print_line(self) -> None:
        self.last_print = now = time.perf_counter()
        eta = self.eta_seconds()
        self.console.print(
            f"progress: {self._requests_text()} ({self.num_failed} failed), {self.output_tokens_per_s:,.1f} output "
            f"tok/s, elapsed {now - self.start:,.0f}s, eta {'?' if eta is None else f'{eta:,.0f}s'}",
            highlight=False, soft_wrap=True,
        )


class ProgressMetrics:
    """The engine's metrics calls, passed on to the metrics file, with each step's tokens also counted by the
    progress display."""

    def __init__(self, metrics: Any, progress: ProgressWriter) -> None:
        self.metrics, self.progress = metrics, progress

    def record_step(self, **step: Any) -> None:
        self.progress.count_step(num_decode_tokens=step["num_decode_tokens"])
        self.metrics.record_step(**step)

    def close(self, **summary: Any) -> None:
        self.metrics.close(**summary)
