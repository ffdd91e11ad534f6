"""`batchrun run` as a library call: checks the plan against its input and model, loads the model, opens the
output (resuming what is there), writes the plan's error records, and runs the engine over the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from batchrun import defaults
from batchrun.errors import UserError
from batchrun.metrics import MetricsRecorder, metrics_path_for
from batchrun.model.spec import ModelSpec, resolve_model
from batchrun.output import OutputWriter, default_errors_path
from batchrun.plan import Plan
from batchrun.plan_checks import check_plan, check_same_plan
from batchrun.planfile import load_plan
from batchrun.progress import ProgressWriter
from batchrun.requests import file_fingerprint

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunOutcome:
    num_requests: int  # valid requests and invalid lines in the plan: one output line each
    num_resumed: int  # already in the output before this run
    num_completed: int  # completed by this run
    num_failed: int  # error lines written by this run (invalid lines and run-time failures)
    output_tokens: int
    wall_seconds: float  # generation only: model loading excluded
    errors_path: Path | None  # where error lines went (None: into the output)

    @property
    def is_clean(self) -> bool:
        return self.num_failed == 0


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


def plan_model(plan: Plan, model: str | None) -> ModelSpec:
    """The model to run: the one the plan names, or `model` (another copy of it); refused if it differs."""
    spec = resolve_model(model or plan.header.model_path, dtype=plan.header.model_dtype)
    check_plan(plan.header, input_fingerprint=file_fingerprint(Path(plan.header.input_path)), model=spec)
    return spec


@dataclass
class RunSession:
    """An open run: the output (resumed), progress and metrics; the plan's error records already written."""

    writer: OutputWriter
    progress: ProgressWriter
    metrics: MetricsRecorder
    num_resumed: int
    total: int  # requests plus invalid lines: one output line each

    def skip_ids(self, plan: Plan) -> set[str]:
        return {r.id for r in plan.requests if self.writer.is_done(r)}


def errors_path_for(plan: Plan, output: Path, errors_path: Path | None) -> Path | None:
    """Where error lines go: `errors_path`; else, for OpenAI-format input, a separate error file beside the
    output as the OpenAI Batch API keeps one; else (plain input) into the output."""
    if errors_path is not None:
        return errors_path
    records = [*plan.requests[:1], *plan.invalid[:1]]
    return default_errors_path(output) if any(r.format == "openai" for r in records) else None


@contextmanager
def open_run(plan: Plan, plan_path: Path, output: Path, *, errors_path: Path | None, spec: ModelSpec,
             device: str, console: Console, is_ordered: bool = False, **run_info: object) -> Iterator[RunSession]:
    """Opens the output for appending (resuming what is there), the progress display and the metrics file,
    and writes an error line for each of the plan's invalid records not yet in the output. The caller has
    checked (check_same_plan) that the output was not written from another plan, before loading a model.
    `errors_path` is the resolved one (errors_path_for); `is_ordered` writes lines in input order."""
    info = {"plan_fingerprint": plan.header.fingerprint, "plan": str(plan_path.resolve()),
            "kv_budget_bytes": plan.header.params.kv_budget_bytes, "device": device, "model": spec.name,
            "dtype": spec.config.dtype, "errors_path": str(errors_path.resolve()) if errors_path else None,
            **run_info}
    with OutputWriter(output, errors_path=errors_path, model_name=spec.name,
                      system_fingerprint=f"fp_{spec.fingerprint[:12]}") as writer:
        records = [*(r for r in plan.requests if r.sample_index == 0), *plan.invalid]  # one line each
        if is_ordered:
            writer.set_order(records)
        num_resumed = sum(map(writer.is_done, records))
        total = len(records)
        with ProgressWriter(writer, total=total, num_done=num_resumed, console=console,
                            interval_s=defaults.PROGRESS_INTERVAL_S) as progress, \
                MetricsRecorder(metrics_path_for(output), run_info=info) as metrics:
            for record in plan.invalid:
                if not writer.is_done(record):
                    progress.write_error(record)
            yield RunSession(writer, progress, metrics, num_resumed, total)


def run_plan_file(plan_path: Path, output: Path, *, errors_path: Path | None, model: str | None, device: str,
                  console: Console, threads: int | None = None, is_ordered: bool = False) -> RunOutcome:
    import torch

    from batchrun.attention import select_backend
    from batchrun.engine.engine import Engine
    from batchrun.model.loader import load_model
    from batchrun.tokenizer import load_tokenizer

    plan = load_plan(plan_path)
    spec = plan_model(plan, model)
    check_same_plan(output, plan.header.fingerprint)  # before the slow model load: a mistake fails fast
    torch_device = resolve_device(device)
    if threads is not None:
        # OpenMP threads that outnumber the free cores spin against each other: on a shared machine one
        # thread per free core is many times faster than one per core.
        torch.set_num_threads(threads)
    loaded = load_model(spec, device=torch_device)
    tokenizer = load_tokenizer(spec)
    errors_path = errors_path_for(plan, output, errors_path)
    with open_run(plan, plan_path, output, errors_path=errors_path, spec=spec, device=str(torch_device),
                  console=console, is_ordered=is_ordered) as run:
        engine = Engine(loaded, tokenizer, plan, kv_budget_bytes=plan.header.params.kv_budget_bytes,
                        backend=select_backend(torch_device))
        start = time.perf_counter()
        summary = engine.run(run.progress, run.metrics, skip_ids=run.skip_ids(plan))
        wall = time.perf_counter() - start
    return RunOutcome(num_requests=run.total, num_resumed=run.num_resumed, num_completed=summary.num_completed,
                      num_failed=run.progress.num_failed, output_tokens=summary.output_tokens, wall_seconds=wall,
                      errors_path=run.writer.errors_path)
