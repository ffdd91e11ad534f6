"""The metrics file: a JSONL file beside the output, one segment per run ("run", "step", "worker" and
"summary" records), written by MetricsRecorder as the engine goes; `stats` reads it back."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from batchrun.jsonl import open_append, repair_torn_tail, write_all

METRICS_SUFFIX = ".metrics.jsonl"
# Steps are buffered and written in one call every STEP_FLUSH_STEPS steps or STEP_FLUSH_INTERVAL_S seconds:
# a write per step would cost more than a small model's decode step, and a kill loses at most that much.
STEP_FLUSH_STEPS = 256
STEP_FLUSH_INTERVAL_S = 2.0
# `kv_bytes` is the KV memory in use after the step's allocations; `num_preempted` the requests preempted to
# make room for it (0 when a file written before preemption existed lacks it).
STEP_FIELDS = ("t", "seconds", "num_running", "num_decode_tokens", "num_prefill_tokens", "kv_bytes", "num_preempted")
SUMMARY_FIELDS = ("wall_seconds", "prompt_tokens", "computed_prompt_tokens", "output_tokens", "peak_kv_bytes",
                  "num_preemptions")
# A distributed run's per-worker record (besides node and device): the report derives its throughput.
WORKER_FIELDS = ("worker", "units", "requests", "busy_seconds", "computed_prompt_tokens", "output_tokens")


def metrics_path_for(output_path: str | os.PathLike[str]) -> Path:
    """`out.jsonl` → `out.jsonl.metrics.jsonl`."""
    return Path(str(output_path) + METRICS_SUFFIX)


def output_path_for(metrics_path: str | os.PathLike[str]) -> Path:
    s = str(metrics_path)
    assert s.endswith(METRICS_SUFFIX), s
    return Path(s[: -len(METRICS_SUFFIX)])


class MetricsRecorder:
    """Appends one run segment to the metrics file: a "run" record now, "step" records in batches, and a
    "summary" record at `close`. A run that dies (kill, exception) leaves a segment without a summary; the
    report then derives its numbers from the steps.

    `run_info` goes into the run record as is (JSON values). The report reads these keys when present:
    `plan_fingerprint`, `kv_budget_bytes`, `device`, `model`, `dtype`, `errors_path` (the `--errors` file,
    so the report counts its lines).
    """

    def __init__(self, path: str | os.PathLike[str], *, run_info: dict[str, Any]) -> None:
        assert not {"type", "time"} & run_info.keys(), "run_info may not set 'type' or 'time'"
        self.path = Path(path)
        # A kill mid-flush in an earlier segment leaves a torn line; appending after it would merge two lines.
        repair_torn_tail(self.path)
        self._fd: int | None = open_append(self.path)
        self._start = time.perf_counter()
        self._last_flush = self._start
        self._buffer: list[bytes] = []
        self._append([orjson.dumps({"type": "run", "time": time.time(), **run_info})])

    def record_step(self, *, seconds: float, num_running: int, num_decode_tokens: int,
                    num_prefill_tokens: int, kv_bytes: int, num_preempted: int = 0, t: float | None = None,
                    worker: int | None = None) -> None:
        """A step that just ended; or, for a step a distributed worker ran, when it ended (`t`, seconds from
        the start of generation) and the `worker` that ran it."""
        now = time.perf_counter()
        t = now - self._start if t is None else t
        record = {
            "type": "step", "t": round(t, 6), "seconds": round(seconds, 6),
            "num_running": num_running, "num_decode_tokens": num_decode_tokens,
            "num_prefill_tokens": num_prefill_tokens, "kv_bytes": kv_bytes, "num_preempted": num_preempted,
        }
        if worker is not None:
            record["worker"] = worker
        self._buffer.append(orjson.dumps(record))
        if len(self._buffer) >= STEP_FLUSH_STEPS or now - self._last_flush >= STEP_FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._append(self._buffer)
            self._buffer = []
        self._last_flush = time.perf_counter()

    def record_worker(self, *, worker: int, node: str, device: str, units: int, requests: int,
                      busy_seconds: float, computed_prompt_tokens: int, output_tokens: int, is_lost: bool) -> None:
        """A distributed run's totals for one worker (before `close`): `busy_seconds` is the time its units
        ran; `is_lost` that it died during the run (its unfinished work went to the others)."""
        self._buffer.append(orjson.dumps({
            "type": "worker", "worker": worker, "node": node, "device": device, "units": units,
            "requests": requests, "busy_seconds": round(busy_seconds, 6),
            "computed_prompt_tokens": computed_prompt_tokens, "output_tokens": output_tokens, "is_lost": is_lost,
        }))

    def close(self, *, wall_seconds: float, prompt_tokens: int, computed_prompt_tokens: int,
              output_tokens: int, peak_kv_bytes: int, num_preemptions: int = 0) -> None:
        """Ends the segment with its summary. `wall_seconds` is generation time (first step to last), not
        model loading; token counts are those of this segment."""
        assert self._fd is not None, "MetricsRecorder closed twice"
        self._buffer.append(orjson.dumps({
            "type": "summary", "time": time.time(), "wall_seconds": round(wall_seconds, 6),
            "prompt_tokens": prompt_tokens, "computed_prompt_tokens": computed_prompt_tokens,
            "output_tokens": output_tokens, "peak_kv_bytes": peak_kv_bytes, "num_preemptions": num_preemptions,
        }))
        self._finish()

    def _finish(self) -> None:
        self.flush()
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def _append(self, records: list[bytes]) -> None:
        assert self._fd is not None, "MetricsRecorder is closed"
        write_all(self._fd, b"".join(r + b"\n" for r in records), path=self.path)

    def __enter__(self) -> MetricsRecorder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Without close() (an exception, Ctrl-C) the steps are kept and the segment reads as killed.
        if self._fd is not None:
            self._finish()
