"""One worker of a distributed run: loads the model once, then runs units (sub-plans) with the engine and
streams their results back in batches. A plain class: the driver makes it a Ray actor; tests can call it as is.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator

import torch

from batchrun import defaults
from batchrun.distributed.messages import FLUSH_INTERVAL_S, Result, ResultBatch, StepRecord, UnitTask, WorkerInfo
from batchrun.engine.engine import Engine
from batchrun.errors import UserError
from batchrun.output import Completion
from batchrun.requests import Request


class UnitWorker:
    """Holds a loaded model; `run_unit` runs one sub-plan. Calls are sequential (one unit at a time)."""

    def __init__(self, *, model_path: str, dtype: str, fingerprint: str, device: str,
                 num_threads: int | None = None) -> None:
        from batchrun.model.loader import load_model
        from batchrun.model.spec import resolve_model
        from batchrun.tokenizer import load_tokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)  # the CPU share the scheduler gave this worker, no more
        spec = resolve_model(model_path, dtype=dtype)
        if spec.fingerprint != fingerprint:
            raise UserError(f"worker on {socket.gethostname()}: model {model_path!r} differs from the driver's "
                            f"(fingerprint {spec.fingerprint}, expected {fingerprint}); install the same copy")
        self.device = torch.device(device)
        self.model = load_model(spec, device=self.device)
        self.tokenizer = load_tokenizer(spec)

    def info(self) -> WorkerInfo:
        return WorkerInfo(node=socket.gethostname(), pid=os.getpid(), device=str(self.device))

    def run_unit(self, task: UnitTask) -> Iterator[ResultBatch]:
        """Runs the unit's requests, yielding results in batches as they finish; the last batch carries the
        engine's summary. The engine runs in a thread so that finished results can be yielded mid-run."""
        # Each unit its own run-level stream for unseeded sampling (seeded requests have theirs): units with
        # identical prompts would otherwise draw the same tokens.
        engine = Engine(self.model, self.tokenizer, task.plan, kv_budget_bytes=task.kv_budget_bytes,
                        seed=defaults.RUN_SEED + task.unit)
        sink = _Sink(task)
        thread = threading.Thread(target=sink.run, args=(engine,), daemon=True, name=f"unit-{task.unit}")
        thread.start()
        while True:
            item = sink.out.get()
            if isinstance(item, BaseException):
                thread.join()
                raise item
            yield item
            if item.summary is not None:
                break
        thread.join()


class _Sink:
    """The engine's writer and metrics for one unit: buffers results and steps, hands batches to `out`."""

    def __init__(self, task: UnitTask) -> None:
        self.task = task
        self.index = {(r.line, r.sample_index): i for i, r in enumerate(task.plan.requests)}  # ids repeat with n
        self.out: queue.SimpleQueue[ResultBatch | BaseException] = queue.SimpleQueue()
        self.batch = ResultBatch(task.unit)
        self.last_flush = time.monotonic()

    def run(self, engine: Engine) -> None:
        try:
            summary = engine.run(self, self)
        except BaseException as e:  # handed to the generator, which raises it in the actor call
            self.out.put(e)
            return
        self.batch.summary = summary
        self._flush()

    def write_completion(self, request: Request, completion: Completion) -> None:
        self.batch.results.append(Result(self.index[request.line, request.sample_index], completion))
        self._maybe_flush()

    def write_error(self, record: Request, *, code: str | None = None, message: str | None = None) -> None:
        assert code is not None and message is not None
        self.batch.results.append(Result(self.index[record.line, record.sample_index], None, code, message))
        self._maybe_flush()

    def record_step(self, *, seconds: float, num_running: int, num_decode_tokens: int, num_prefill_tokens: int,
                    kv_bytes: int, num_preempted: int) -> None:
        self.batch.steps.append(StepRecord(time.time(), seconds, num_running, num_decode_tokens,
                                           num_prefill_tokens, kv_bytes, num_preempted))
        self._maybe_flush()

    def close(self, **summary: float) -> None:
        """The engine's end-of-run totals arrive in its RunSummary instead."""

    def _maybe_flush(self) -> None:
        if len(self.batch.results) >= self.task.flush_results or (
                time.monotonic() - self.last_flush >= FLUSH_INTERVAL_S and (self.batch.results or self.batch.steps)):
            self._flush()

    def _flush(self) -> None:
        self.out.put(self.batch)
        self.batch = ResultBatch(self.task.unit)
        self.last_flush = time.monotonic()
