"""What the driver and its workers send each other: a unit to run (UnitTask), the worker's identity
(WorkerInfo), and its results streamed back in batches (ResultBatch of Results and StepRecords).

Plain data, no torch: the driver imports these without the engine that the workers run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from batchrun.distributed.subplan import SubPlan
from batchrun.output import Completion

if TYPE_CHECKING:
    from batchrun.engine.engine import RunSummary

# A batch goes back when it holds this many results or is this old, whichever first: one message per result
# would cost more than a short request's decode; a long wait would make progress and resume coarse.
FLUSH_RESULTS = 64
FLUSH_INTERVAL_S = 0.5


class StepRecord(NamedTuple):
    time: float  # wall clock (time.time()) at the end of the step
    seconds: float
    num_running: int
    num_decode_tokens: int
    num_prefill_tokens: int
    kv_bytes: int
    num_preempted: int


class Result(NamedTuple):
    """One finished request of the unit: a completion, or an error when `error_code` is set."""

    index: int  # local row of the sub-plan
    completion: Completion | None
    error_code: str | None = None
    error_message: str | None = None


@dataclass
class ResultBatch:
    unit: int
    results: list[Result] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    summary: RunSummary | None = None  # set on the unit's last batch


@dataclass(frozen=True)
class WorkerInfo:
    node: str
    pid: int
    device: str


@dataclass(frozen=True)
class UnitTask:
    unit: int  # the driver's task number
    plan: SubPlan
    kv_budget_bytes: int
    flush_results: int = FLUSH_RESULTS  # results per batch at most
