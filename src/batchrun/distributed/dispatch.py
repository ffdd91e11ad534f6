"""The driver's dispatch loop: hands units to workers as they free up (largest estimated cost first), writes
the results they stream back, and re-queues the unwritten requests of a worker that dies. Gets the ray module
from the driver (which alone imports it) and the workers' actor handles.
"""

from __future__ import annotations

import heapq
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from batchrun.distributed.messages import ResultBatch, UnitTask, WorkerInfo
from batchrun.distributed.subplan import slice_plan
from batchrun.distributed.units import dispatch_order, make_units, unit_config
from batchrun.metrics import MetricsRecorder
from batchrun.plan import Plan
from batchrun.planner import kv_tokens
from batchrun.progress import ProgressWriter


class BatchEvent(NamedTuple):
    """What `on_batch` receives after each result batch is written (for displays and tests)."""

    worker: int
    actor: Any  # the worker's Ray actor handle
    num_done: int  # output lines written, resumed ones included
    num_total: int
    num_unit_remaining: int  # requests of the worker's current unit still to come


@dataclass
class _Task:
    number: int
    rows: np.ndarray  # int64: plan rows not yet written, in plan order
    cost: int  # estimated (units.py): prefill plus decode tokens


@dataclass
class _WorkerState:
    index: int
    actor: Any
    info: WorkerInfo | None = None
    is_lost: bool = False
    num_units: int = 0
    num_requests: int = 0
    busy_seconds: float = 0.0
    computed_prompt_tokens: int = 0
    output_tokens: int = 0


@dataclass
class _Running:
    """A unit on a worker: its rows not yet written, and the tokens its steps reported so far."""

    worker: _WorkerState
    task: _Task
    rows: np.ndarray  # local row → plan row
    remaining: set[int]
    started: float
    step_prefill_tokens: int = 0
    step_decode_tokens: int = 0


@dataclass
class _Totals:
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    output_tokens: int = 0
    peak_kv_bytes: int = 0


@dataclass
class Dispatcher:
    """Pull scheduling: a worker gets the next unit (largest estimated cost first) when it finishes one."""

    ray: Any
    plan: Plan
    progress: ProgressWriter
    metrics: MetricsRecorder
    total: int
    results_per_batch: int
    on_batch: Callable[[BatchEvent], None] | None
    pending: list[tuple[int, int, _Task]] = field(default_factory=list)  # heap of (-cost, number, task)
    num_completed: int = 0
    num_requeued: int = 0
    num_units_done: int = 0
    last_loss: str = ""
    wall_seconds: float = 0.0
    start_time: float = 0.0  # time.time() when generation started (the first worker ready): steps count from it
    totals: _Totals = field(default_factory=_Totals)

    def __post_init__(self) -> None:
        self.workers: list[_WorkerState] = []
        self.kv_budget_bytes = self.plan.header.params.kv_budget_bytes
        self.kv_bytes_per_token = self.plan.header.kv_bytes_per_token
        self.prompt_len = self.plan.tokens.lengths.astype(np.int64)
        self.max_tokens = self.plan.max_tokens.astype(np.int64)
        self._num_tasks = 0

    @property
    def num_lost(self) -> int:
        return sum(w.is_lost for w in self.workers)

    @property
    def has_work_left(self) -> bool:
        return bool(self.pending)

    def add_workers(self, actors: list[Any]) -> None:
        self.workers += [_WorkerState(len(self.workers) + i, a) for i, a in enumerate(actors)]

    def queue_units(self, is_done: np.ndarray, *, tail_units_per_worker: int) -> None:
        layout = self.plan.layout
        config = unit_config(layout, max_tokens=self.max_tokens,
                             kv_budget_tokens=self.kv_budget_bytes // self.kv_bytes_per_token,
                             num_workers=len(self.workers), tail_units_per_worker=tail_units_per_worker)
        units = make_units(layout, prompt_len=self.prompt_len, max_tokens=self.max_tokens, config=config)
        for u in dispatch_order(units).tolist():
            rows = layout.order[units.start[u]:units.end[u]].astype(np.int64)
            todo = rows[~is_done[rows]]
            if len(todo):
                self._push(todo, int(units.cost[u]) if len(todo) == len(rows) else self._cost(todo))

    def run(self) -> None:
        """Until the queue is empty and every unit is in, or no worker is left (then `has_work_left`)."""
        ray = self.ray
        # Workers load the model at once; each is idle (ready for a unit) when its info call answers.
        starting = {w.actor.info.remote(): w for w in self.workers}
        running: dict[Any, _Running] = {}
        idle: list[_WorkerState] = []
        start: float | None = None  # generation time, as a single run counts it: from the first ready worker
        while True:
            while idle and self.pending:
                self._assign(idle.pop(), running)
            if not (starting or running):
                break
            ready, _ = ray.wait([*starting, *running], num_returns=1)
            for ref in ready:
                if ref not in starting:
                    if (free := self._receive(ref, running)) is not None:
                        idle.append(free)
                    continue
                worker = starting.pop(ref)
                try:
                    worker.info = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._lose(worker, e)
                    continue
                if start is None:
                    start, self.start_time = time.perf_counter(), time.time()
                idle.append(worker)
        self.wall_seconds = time.perf_counter() - start if start is not None else 0.0

    def close_metrics(self) -> None:
        for w in self.workers:
            info = w.info or WorkerInfo(node="?", pid=0, device="?")
            self.metrics.record_worker(worker=w.index, node=info.node, device=info.device, units=w.num_units,
                                       requests=w.num_requests, busy_seconds=w.busy_seconds,
                                       computed_prompt_tokens=w.computed_prompt_tokens,
                                       output_tokens=w.output_tokens, is_lost=w.is_lost)
        t = self.totals
        self.metrics.close(wall_seconds=self.wall_seconds, prompt_tokens=t.prompt_tokens,
                           computed_prompt_tokens=t.computed_prompt_tokens, output_tokens=t.output_tokens,
                           peak_kv_bytes=t.peak_kv_bytes)

    # -- internals -----------------------------------------------------------------------------------------

    def _push(self, rows: np.ndarray, cost: int) -> None:
        self._num_tasks += 1
        heapq.heappush(self.pending, (-cost, self._num_tasks, _Task(self._num_tasks, rows, cost)))

    def _cost(self, rows: np.ndarray) -> int:
        return kv_tokens(self.plan.layout, prompt_len=self.prompt_len, max_tokens=self.max_tokens, requests=rows)

    def _assign(self, worker: _WorkerState, running: dict[Any, _Running]) -> None:
        _, _, task = heapq.heappop(self.pending)
        plan = self.plan
        sub = slice_plan(requests=plan.requests, tokens=plan.tokens, layout=plan.layout, rows=task.rows,
                         kv_budget_tokens=self.kv_budget_bytes // self.kv_bytes_per_token,
                         kv_bytes_per_token=self.kv_bytes_per_token)
        generator = worker.actor.run_unit.remote(UnitTask(task.number, sub, self.kv_budget_bytes,
                                                          flush_results=self.results_per_batch))
        running[generator] = _Running(worker, task, sub.rows, set(task.rows.tolist()), time.perf_counter())

    def _receive(self, generator: Any, running: dict[Any, _Running]) -> _WorkerState | None:
        """Takes the unit's next batch; returns its worker when the unit is over (the worker is free)."""
        ray, unit = self.ray, running[generator]
        try:
            batch: ResultBatch = ray.get(next(generator))
        except StopIteration:
            raise AssertionError("a unit's results ended without the engine's summary") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            # The actor died, or its node did with a batch in its object store: the same loss.
            del running[generator]
            self._lose(unit.worker, e, unit)
            return None
        self._write(batch, unit)
        if self.on_batch is not None:
            self.on_batch(BatchEvent(unit.worker.index, unit.worker.actor, self.progress.num_done, self.total,
                                     len(unit.remaining)))
        if batch.summary is None:
            return None
        assert not unit.remaining, "the engine finished a unit without a result for every request"
        # The stream's end follows the summary at once; not waiting for it saves a round trip per unit.
        del running[generator]
        self._finish(unit, batch)
        return unit.worker

    def _write(self, batch: ResultBatch, unit: _Running) -> None:
        requests = self.plan.requests
        for result in batch.results:
            row = int(unit.rows[result.index])
            unit.remaining.remove(row)  # KeyError: a result twice (a bug)
            if result.completion is not None:
                self.progress.write_completion(requests[row], result.completion)
                self.num_completed += 1
            else:
                self.progress.write_error(requests[row], code=result.error_code, message=result.error_message)
        for s in batch.steps:
            self.metrics.record_step(seconds=s.seconds, num_running=s.num_running,
                                     num_decode_tokens=s.num_decode_tokens, num_prefill_tokens=s.num_prefill_tokens,
                                     kv_bytes=s.kv_bytes, num_preempted=s.num_preempted,
                                     t=max(0.0, s.time - self.start_time),
                                     worker=unit.worker.index)
            unit.step_prefill_tokens += s.num_prefill_tokens
            unit.step_decode_tokens += s.num_decode_tokens
            self.totals.peak_kv_bytes = max(self.totals.peak_kv_bytes, s.kv_bytes)

    def _finish(self, unit: _Running, batch: ResultBatch) -> None:
        summary, worker, t = batch.summary, unit.worker, self.totals
        assert summary is not None
        worker.num_units += 1
        worker.num_requests += len(unit.rows)
        worker.busy_seconds += time.perf_counter() - unit.started
        worker.computed_prompt_tokens += summary.computed_prompt_tokens
        worker.output_tokens += summary.output_tokens
        t.prompt_tokens += summary.prompt_tokens
        t.computed_prompt_tokens += summary.computed_prompt_tokens
        t.output_tokens += summary.output_tokens
        t.peak_kv_bytes = max(t.peak_kv_bytes, summary.peak_kv_bytes)
        self.num_units_done += 1

    def _lose(self, worker: _WorkerState, error: Exception, unit: _Running | None = None) -> None:
        """The worker died: its unwritten requests go back to the queue; what it computed counts as done
        work (as a killed run's steps do)."""
        worker.is_lost = True
        self.last_loss = f"worker {worker.index}: {_reason(error)}"
        if unit is None:
            return
        worker.busy_seconds += time.perf_counter() - unit.started
        worker.computed_prompt_tokens += unit.step_prefill_tokens
        worker.output_tokens += unit.step_decode_tokens
        self.totals.computed_prompt_tokens += unit.step_prefill_tokens
        self.totals.output_tokens += unit.step_decode_tokens
        rows = unit.task.rows
        todo = rows[np.fromiter((r in unit.remaining for r in rows.tolist()), bool, len(rows))]
        if len(todo):
            self.num_requeued += len(todo)
            self._push(todo, self._cost(todo))


def _reason(error: Exception) -> str:
    """One line for a lost worker: the exception its actor raised (e.g. in loading the model), else the
    first line of Ray's message."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    return raised[-1] if raised else lines[0] if lines else type(error).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[\w.]+(Error|Exception): ")
