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
from batchrun.output import OutputWriter
from batchrun.plan import Plan
from batchrun.plan_checks import check_plan, check_same_plan
from batchrun.planfile import load_plan
from batchrun.progress import ProgressWriter
from batchrun.requests import file_fingerprint
from batchrun.sizes import human_bytes

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
    total: int  # valid requests plus invalid lines: one output line each

    def skip_ids(self, plan: Plan) -> set[str]:
        return {r.id for r in plan.requests if self.writer.is_done(r)}


@contextmanager
def open_run(plan: Plan, plan_path: Path, output: Path, *, errors_path: Path | None, spec: ModelSpec,
             device: str, console: Console, **run_info: object) -> Iterator[RunSession]:
    """Opens the output for appending (resuming what is there), the progress display and the metrics file,
    and writes an error line for each of the plan's invalid records not yet in the output. The caller has
    checked (check_same_plan) that the output was not written from another plan, before loading a model."""
    info = {"plan_fingerprint": plan.header.fingerprint, "plan": str(plan_path.resolve()),
            "kv_budget_bytes": plan.header.params.kv_budget_bytes, "device": device, "model": spec.name,
            "dtype": spec.config.dtype, "errors_path": str(errors_path.resolve()) if errors_path else None,
            **run_info}
    with OutputWriter(output, errors_path=errors_path, model_name=spec.name) as writer:
        num_resumed = sum(map(writer.is_done, plan.requests)) + sum(map(writer.is_done, plan.invalid))
        total = len(plan.requests) + len(plan.invalid)
        with ProgressWriter(writer, total=total, num_done=num_resumed, console=console,
                            interval_s=defaults.PROGRESS_INTERVAL_S) as progress, \
                MetricsRecorder(metrics_path_for(output), run_info=info) as metrics:
            for record in plan.invalid:
                if not writer.is_done(record):
                    progress.write_error(record)
            yield RunSession(writer, progress, metrics, num_resumed, total)


def run_plan_file(plan_path: Path, output: Path, *, errors_path: Path | None, model: str | None, device: str,
                  console: Console, threads: int | None = None, kv_budget: str = defaults.RUN_KV_BUDGET,
                  max_step_tokens: int = defaults.MAX_STEP_TOKENS) -> RunOutcome:
    """`kv_budget`: "auto" (sized from the machine once the weights are loaded) or a size; the plan's own
    budget only shaped its batches. The budget used is printed to `console` and kept in the metrics file."""
    import torch

    from batchrun.attention import select_backend
    from batchrun.engine.engine import Engine
    from batchrun.kv_budget import parse_kv_budget, resolve_kv_budget
    from batchrun.model.loader import load_model
    from batchrun.tokenizer import load_tokenizer

    given_kv_budget = parse_kv_budget(kv_budget)
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
    budget = resolve_kv_budget(given_kv_budget, device=torch_device, config=spec.config,
                               max_step_tokens=max_step_tokens)
    num_tokens = budget.num_bytes // spec.config.kv_bytes_per_token
    console.print(f"KV budget {human_bytes(budget.num_bytes)} ({budget.how}): {num_tokens:,} tokens; up to "
                  f"{max_step_tokens} tokens a step", highlight=False)
    with open_run(plan, plan_path, output, errors_path=errors_path, spec=spec, device=str(torch_device),
                  console=console, kv_budget_bytes=budget.num_bytes, kv_budget_how=budget.how,
                  max_step_tokens=max_step_tokens) as run:
        engine = Engine(loaded, tokenizer, plan, kv_budget_bytes=budget.num_bytes, max_step_tokens=max_step_tokens,
                        backend=select_backend(torch_device))
        start = time.perf_counter()
        summary = engine.run(run.progress, run.metrics, skip_ids=run.skip_ids(plan))
        wall = time.perf_counter() - start
    return RunOutcome(num_requests=run.total, num_resumed=run.num_resumed, num_completed=summary.num_completed,
                      num_failed=run.progress.num_failed, output_tokens=summary.output_tokens, wall_seconds=wall)
