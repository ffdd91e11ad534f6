"""Progress lines: the ETA counts tokens (generated per step, plus what early finishers gave back), so the
first line of a run whose requests finish together is sane; steps reach the metrics file unchanged."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from batchrun import progress as progress_module
from batchrun.output import Completion
from batchrun.progress import ProgressMetrics, ProgressWriter
from batchrun.requests import Request, SamplingParams


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def write_completion(self, request: Request, completion: Completion) -> None:
        self.calls.append(("completion", {"id": request.id}))

    def write_error(self, record: Any, **kw: Any) -> None:
        self.calls.append(("error", {"id": record.id, **kw}))

    def record_step(self, **step: Any) -> None:
        self.calls.append(("step", step))

    def close(self, **summary: Any) -> None:
        self.calls.append(("close", summary))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(i: int, max_tokens: int) -> Request:
    return Request(id=f"r{i}", line=i + 1, format="plain", endpoint="completion",
                   sampling=SamplingParams(max_tokens=max_tokens))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    return clock


def test_eta_from_tokens_not_from_finished_requests(clock: Clock) -> None:
    buf, sink = io.StringIO(), Recorder()
    console = Console(file=buf, width=200)
    requests = [request(i, 10) for i in range(4)]
    with ProgressWriter(sink, total=4, num_done=0, console=console, interval_s=0.0, total_tokens=40) as progress:
        metrics = ProgressMetrics(sink, progress)
        assert progress.eta_seconds() is None  # nothing done yet: no estimate rather than a wild one
        clock.now += 2.0
        metrics.record_step(seconds=2.0, num_running=4, num_decode_tokens=4, num_prefill_tokens=0, kv_bytes=0)
        clock.now += 2.0
        metrics.record_step(seconds=2.0, num_running=4, num_decode_tokens=4, num_prefill_tokens=0, kv_bytes=0)
        assert progress.done_tokens == 8 and progress.eta_seconds() == pytest.approx(32 * 4.0 / 8)
        first_line = buf.getvalue().splitlines()[0]
        assert "0/4 requests" in first_line and "eta 18s" in first_line  # 4 of 40 tokens in 2 s; no request done yet
        progress.write_completion(requests[0], Completion([5, 6, 1], "", "stop", 3))  # gives back 7
        assert progress.done_tokens == 15
        for r in requests[1:3]:
            progress.write_completion(r, Completion([5] * 10, "", "length", 3))
        progress.write_error(requests[3], code="nan_logits", message="m")
        assert progress.done_tokens == 40 and progress.eta_seconds() == 0.0
    assert [c[0] for c in sink.calls] == ["step", "step", "completion", "completion", "completion", "error"]
    assert sink.calls[0][1]["num_decode_tokens"] == 4
    assert buf.getvalue().splitlines()[-1].startswith("progress: 4/4 requests (1 failed)")


def test_without_steps_results_alone_drive_the_estimate(clock: Clock) -> None:
    console = Console(file=io.StringIO(), width=200)
    with ProgressWriter(Recorder(), total=2, num_done=0, console=console, interval_s=60.0,
                        total_tokens=20) as progress:
        clock.now += 1.0
        progress.write_completion(request(0, 10), Completion([5] * 4, "", "stop", 3))
        assert progress.done_tokens == 10 and progress.eta_seconds() == pytest.approx(1.0)
