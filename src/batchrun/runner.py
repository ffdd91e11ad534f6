"""`batchrun run` as a library call: checks the plan against its input and model, loads the model, opens the
output (resuming what is there), writes the plan's error records, and runs the engine over the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rich.console import Console

from batchrun import defaults
from batchrun.claim import ClaimedOutput, claim_output
from batchrun.errors import UserError
from batchrun.metrics import MetricsRecorder, metrics_path_for
from batchrun.model.spec import ModelSpec, resolve_model
from batchrun.output import OutputWriter, default_errors_path
from batchrun.plan import Plan
from batchrun.plan_checks import check_plan, check_plan_tokens
from batchrun.planfile import load_plan
from batchrun.progress import ProgressMetrics, ProgressWriter
from batchrun.requests import file_fingerprint
from batchrun.sizes import human_bytes

if TYPE_CHECKING:
    import torch

    from batchrun.engine.engine import Engine
    from batchrun.kv_budget import KVBudget


@dataclass(frozen=True)
class RunOutcome:
    num_requests: int  # valid requests and invalid lines in the plan: one output line each
    num_resumed: int  # already in the output before this run
    num_completed: int  # completed by this run
    num_failed: int  # error lines written by this run (invalid lines and run-time failures)
    num_resumed_failed: int  # error lines of this plan already in the output: the job still has failures
    output_tokens: int
    wall_seconds: float  # generation only: model loading excluded
    errors_path: Path | None  # where error lines went (None: into the output)

    @property
    def is_clean(self) -> bool:
        return self.num_failed == 0 and self.num_resumed_failed == 0


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when there is one), 'cpu' or 'cuda'; UserError when CUDA is asked for and absent."""
    import torch  # the distributed driver imports this module and never touches a device itself

    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {name!r}", exit_code=2)
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def plan_model(plan: Plan, *, plan_path: Path, model: str | None, input_path: Path | None = None) -> ModelSpec:
    """The model to run: the one the plan names, or `model` (another copy of it); refused if it differs, or
    if the plan's input (`input_path` when given, else the one the plan records) has changed."""
    spec = resolve_model(model or plan.header.model_path, dtype=plan.header.model_dtype)
    check_plan(plan.header, input_fingerprint=file_fingerprint(plan_input(plan, plan_path, input_path)), model=spec)
    check_plan_tokens(plan.tokens, model=spec)
    return spec


def plan_input(plan: Plan, plan_path: Path, input_path: Path | None) -> Path:
    """`input_path`, or the input the plan records (relative to its folder); UserError saying how to give it."""
    if input_path is not None:
        return input_path
    recorded = plan.header.input_file(plan_path)
    if not recorded.is_file():
        raise UserError(f"the plan's input {recorded} is not there (the plan records {plan.header.input_path!r}, "
                        "relative to the plan's folder): give the input with --input FILE")
    return recorded


@dataclass
class RunSession:
    """An open run: the output (resumed), progress and metrics; the plan's error records already written."""

    writer: OutputWriter
    progress: ProgressWriter
    metrics: MetricsRecorder
    num_resumed: int
    num_resumed_failed: int  # of those, error lines
    total: int  # requests plus invalid lines: one output line each

    def skip_ids(self, plan: Plan) -> set[str]:
        return {r.id for r in plan.requests if self.writer.is_done(r)}


def default_errors(plan: Plan, output: Path) -> Path | None:
    """Where a new job's error lines go unless --errors says: for OpenAI-format input, a separate error file
    beside the output, as the OpenAI Batch API keeps one; for plain input, into the output (None)."""
    records = [*plan.requests[:1], *plan.invalid[:1]]
    return default_errors_path(output) if any(r.format == "openai" for r in records) else None


@contextmanager
def open_run(plan: Plan, plan_path: Path, output: Path, *, errors_path: Path | None, spec: ModelSpec,
             device: str, console: Console, input_path: Path | None = None, is_ordered: bool = False,
             **run_info: object) -> Iterator[RunSession]:
    """Opens the output for appending (resuming what is there), the progress display and the metrics file,
    and writes an error line for each of the plan's invalid records not yet in the output. The caller has
    called check_output before loading a model, so that a mistake fails fast; the output is claimed here for
    the whole run (claim.py: locked, proven to be this plan's, the recorded errors file re-used).
    `errors_path` is --errors (see claim_output for the default); `is_ordered` writes lines in input order."""
    with _claim(plan, plan_path, output, errors_path=errors_path, input_path=input_path) as claimed, \
            OutputWriter(output, errors_path=claimed.errors_path, model_name=spec.name,
                         system_fingerprint=f"fp_{spec.fingerprint[:12]}") as writer:
        errors_path = claimed.errors_path
        info = {"plan_fingerprint": plan.header.fingerprint, "plan": str(plan_path.resolve()),
                "kv_budget_bytes": plan.header.params.kv_budget_bytes, "device": device, "model": spec.name,
                "dtype": spec.config.dtype, "errors_path": str(errors_path.resolve()) if errors_path else None,
                **run_info}
        records = [*(r for r in plan.requests if r.sample_index == 0), *plan.invalid]  # one line each
        if is_ordered:
            writer.set_order(records)
        num_resumed = sum(map(writer.is_done, records))
        error_lines = writer.done_lines()
        num_resumed_failed = sum(r.line in error_lines for r in records)
        total = len(records)
        total_tokens = sum(r.sampling.max_tokens for r in plan.requests if not writer.is_done(r))
        with ProgressWriter(writer, total=total, num_done=num_resumed, console=console, total_tokens=total_tokens,
                            interval_s=defaults.PROGRESS_INTERVAL_S) as progress, \
                MetricsRecorder(metrics_path_for(output), run_info=info) as metrics:
            for record in plan.invalid:
                if not writer.is_done(record):
                    progress.write_error(record)
            yield RunSession(writer, progress, metrics, num_resumed, num_resumed_failed, total)


def check_output(plan: Plan, plan_path: Path, output: Path, *, errors_path: Path | None,
                 input_path: Path | None = None) -> None:
    """Refuses (UserError) an output that open_run could not claim: claimed and released at once."""
    with _claim(plan, plan_path, output, errors_path=errors_path, input_path=input_path):
        pass


def _claim(plan: Plan, plan_path: Path, output: Path, *, errors_path: Path | None,
           input_path: Path | None) -> AbstractContextManager[ClaimedOutput]:
    return claim_output(output, errors_path=errors_path, plan_path=plan_path,
                        input_path=input_path or plan.header.input_file(plan_path),
                        plan_fingerprint=plan.header.fingerprint, default_errors_path=default_errors(plan, output))


def run_plan_file(plan_path: Path, output: Path, *, errors_path: Path | None, model: str | None, device: str,
                  console: Console, threads: int | None = None, input_path: Path | None = None,
                  is_ordered: bool = False, kv_budget: str = defaults.RUN_KV_BUDGET,
                  max_step_tokens: int = defaults.MAX_STEP_TOKENS) -> RunOutcome:
    """`kv_budget`: "auto" (sized from the machine once the weights are loaded) or a size; the plan's own
    budget only shaped its batches. The budget used is printed to `console` and kept in the metrics file."""
    from batchrun.kv_budget import parse_kv_budget
    from batchrun.tokenizer import load_tokenizer

    given_kv_budget = parse_kv_budget(kv_budget)  # a bad option fails before anything is loaded
    plan = load_plan(plan_path)
    spec = plan_model(plan, plan_path=plan_path, model=model, input_path=input_path)
    # before the slow model load: a mistake fails fast
    check_output(plan, plan_path, output, errors_path=errors_path, input_path=input_path)
    prepared = prepare_engine(plan, spec, load_tokenizer(spec), device=device, threads=threads,
                              kv_budget=given_kv_budget, max_step_tokens=max_step_tokens)
    console.print(f"KV budget {human_bytes(prepared.kv_budget.num_bytes)} ({prepared.kv_budget.how}): "
                  f"{prepared.kv_budget.num_bytes // spec.config.kv_bytes_per_token:,} tokens; up to "
                  f"{max_step_tokens} tokens a step", highlight=False)
    with open_run(plan, plan_path, output, errors_path=errors_path, spec=spec, device=str(prepared.device),
                  console=console, input_path=input_path, is_ordered=is_ordered,
                  kv_budget_bytes=prepared.kv_budget.num_bytes, kv_budget_how=prepared.kv_budget.how,
                  max_step_tokens=max_step_tokens) as run:
        start = time.perf_counter()
        summary = prepared.engine.run(run.progress, ProgressMetrics(run.metrics, run.progress),
                                      skip_ids=run.skip_ids(plan))
        wall = time.perf_counter() - start
    return RunOutcome(num_requests=run.total, num_resumed=run.num_resumed, num_completed=summary.num_completed,
                      num_failed=run.progress.num_failed, num_resumed_failed=run.num_resumed_failed,
                      output_tokens=summary.output_tokens, wall_seconds=wall, errors_path=run.writer.errors_path)


class PreparedEngine(NamedTuple):
    engine: Engine
    device: torch.device
    kv_budget: KVBudget  # what the engine runs with, and how it was chosen


def prepare_engine(plan: Plan, spec: ModelSpec, tokenizer: Any, *, device: str, threads: int | None,
                   kv_budget: int | None = None,
                   max_step_tokens: int = defaults.MAX_STEP_TOKENS) -> PreparedEngine:
    """The model loaded on `device` ('auto', 'cpu' or 'cuda') and an Engine over `plan` with its backend;
    `kv_budget` in bytes, or None: sized from the machine once the weights are loaded (kv_budget.py)."""
    import torch

    from batchrun.attention import select_backend
    from batchrun.engine.engine import Engine
    from batchrun.kv_budget import resolve_kv_budget
    from batchrun.model.loader import load_model

    torch_device = resolve_device(device)
    if threads is not None:
        # OpenMP threads that outnumber the free cores spin against each other: on a shared machine one
        # thread per free core is many times faster than one per core.
        torch.set_num_threads(threads)
    loaded = load_model(spec, device=torch_device)
    budget = resolve_kv_budget(kv_budget, device=torch_device, config=spec.config, max_step_tokens=max_step_tokens)
    engine = Engine(loaded, tokenizer, plan, kv_budget_bytes=budget.num_bytes, max_step_tokens=max_step_tokens,
                    backend=select_backend(torch_device))
    return PreparedEngine(engine, torch_device, budget)
