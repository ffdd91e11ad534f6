"""The driver of a distributed run: starts (or joins) a Ray cluster and its workers, opens the one output,
progress and metrics, and lets the dispatch loop run the plan's units on the workers. The only module that
imports ray, and only when a distributed run starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from batchrun.distributed.dispatch import BatchEvent, Dispatcher
from batchrun.distributed.messages import FLUSH_RESULTS
from batchrun.distributed.units import TAIL_UNITS_PER_WORKER
from batchrun.distributed.watchdog import Watchdog
from batchrun.errors import UserError
from batchrun.model.spec import ModelSpec
from batchrun.planfile import load_plan
from batchrun.runner import RunOutcome, check_output, open_run, plan_model


@dataclass(frozen=True)
class ClusterOutcome(RunOutcome):
    num_workers: int  # workers started
    num_workers_lost: int  # workers that died (their unfinished work went to the others)
    num_units: int  # units run to the end (re-queued remainders included)
    num_requeued: int  # requests re-queued after their worker died


@dataclass(frozen=True)
class ClusterSpec:
    """Where the workers run: how many, on which device, with how many CPUs each."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: int

    def __post_init__(self) -> None:
        assert self.num_workers >= 1 and self.cpus_per_worker >= 1, self


def run_distributed(plan_path: Path, output: Path, *, errors_path: Path | None, model: str | None, device: str,
                    workers: int | None, ray_address: str | None, console: Console,
                    cpus_per_worker: int | None = None, tail_units_per_worker: int = TAIL_UNITS_PER_WORKER,
                    results_per_batch: int = FLUSH_RESULTS,
                    on_batch: Callable[[BatchEvent], None] | None = None,
                    input_path: Path | None = None, is_ordered: bool = False) -> ClusterOutcome:
    """`batchrun run` over many workers: the same output, resume rules and metrics file as a single run.

    Starts a local Ray cluster of `workers` workers, or joins the cluster at `ray_address` (then `workers`
    defaults to one per GPU there); a Ray session already open in this process is used as it is. Raises
    UserError when Ray is missing, the options do not fit the cluster, or every worker died (resume later).
    `tail_units_per_worker` sets the smallest unit (units.py); `results_per_batch` caps the results a worker
    sends in one message (it also sends what it has every FLUSH_INTERVAL_S); `on_batch` is called after each
    batch is written; `input_path` overrides the input the plan records (`run --input`).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}", exit_code=2)
    ray = _import_ray()
    plan = load_plan(plan_path)
    spec = plan_model(plan, plan_path=plan_path, model=model, input_path=input_path)
    # before starting Ray: a mistake fails fast
    check_output(plan, plan_path, output, errors_path=errors_path, input_path=input_path)
    is_owner = not ray.is_initialized()
    watchdog = None
    if is_owner:
        _start_ray(ray, device=device, workers=workers, ray_address=ray_address)
        if ray_address is None:  # a local cluster: its processes are this process's descendants
            watchdog = Watchdog()
    try:
        cluster = _cluster_spec(ray, device=device, workers=workers, cpus_per_worker=cpus_per_worker)
        with open_run(plan, plan_path, output, errors_path=errors_path, spec=spec, is_ordered=is_ordered,
                      input_path=input_path,
                      device="cuda" if cluster.use_gpu else "cpu", console=console,
                      workers=cluster.num_workers, ray_address=ray_address) as run:
            is_done = np.fromiter(map(run.writer.is_done, plan.requests), bool, len(plan.requests))
            dispatcher = Dispatcher(ray, plan, progress=run.progress, metrics=run.metrics, total=run.total,
                                    results_per_batch=results_per_batch, on_batch=on_batch)
            if not is_done.all():  # else nothing is left: no worker starts
                _run_workers(ray, dispatcher, cluster, spec, is_done=is_done,
                             tail_units_per_worker=tail_units_per_worker)
            dispatcher.close_metrics()
    finally:
        if is_owner:
            ray.shutdown()
        if watchdog is not None:
            watchdog.release()
    if dispatcher.has_work_left:
        raise UserError(f"every worker died ({dispatcher.num_lost} of {cluster.num_workers}; the last: "
                        f"{dispatcher.last_loss}); the results so far are in {output}: run again to resume")
    return ClusterOutcome(
        num_requests=run.total, num_resumed=run.num_resumed, num_completed=dispatcher.num_completed,
        num_failed=run.progress.num_failed, num_resumed_failed=run.num_resumed_failed,
        output_tokens=run.progress.output_tokens,
        wall_seconds=dispatcher.wall_seconds, errors_path=run.writer.errors_path,
        num_workers=len(dispatcher.workers), num_workers_lost=dispatcher.num_lost,
        num_units=dispatcher.num_units_done, num_requeued=dispatcher.num_requeued,
    )


def _run_workers(ray: Any, dispatcher: Dispatcher, cluster: ClusterSpec, spec: ModelSpec, *, is_done: np.ndarray,
                 tail_units_per_worker: int) -> None:
    """Starts the workers (each loads the model), runs the plan's remaining units on them, and stops them."""
    from batchrun.distributed.worker import UnitWorker  # torch and the engine: in the actors, not the driver

    actor_class = ray.remote(UnitWorker).options(
        num_cpus=cluster.cpus_per_worker, num_gpus=1 if cluster.use_gpu else 0, max_restarts=0)
    actors = [actor_class.remote(model_path=spec.location, dtype=spec.config.dtype, fingerprint=spec.fingerprint,
                                 device="cuda" if cluster.use_gpu else "cpu",
                                 num_threads=None if cluster.use_gpu else cluster.cpus_per_worker)
              for _ in range(cluster.num_workers)]
    try:
        dispatcher.add_workers(actors)
        dispatcher.queue_units(is_done, tail_units_per_worker=tail_units_per_worker)
        dispatcher.run()
    finally:
        for actor in actors:
            ray.kill(actor)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("a run on several workers needs Ray: pip install 'batchrun[ray]'", exit_code=2) from None
    return ray


def _start_ray(ray: Any, *, device: str, workers: int | None, ray_address: str | None) -> None:
    if ray_address is not None:
        try:
            ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as e:
            raise UserError(f"cannot join the Ray cluster at {ray_address!r}: {e}") from None
        return
    if workers is None or workers < 1:
        raise UserError("give the number of workers (--workers N) for a local cluster", exit_code=2)
    import torch

    num_gpus = torch.cuda.device_count() if device != "cpu" else 0
    # Logical CPUs: at least one per worker, so that every actor is placed even on a small machine.
    ray.init(num_cpus=max(os.cpu_count() or 1, workers), num_gpus=num_gpus, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)


def _cluster_spec(ray: Any, *, device: str, workers: int | None, cpus_per_worker: int | None) -> ClusterSpec:
    resources = ray.cluster_resources()
    num_gpus, num_cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    use_gpu = device == "cuda" or (device == "auto" and num_gpus > 0)
    if use_gpu:
        if num_gpus == 0:
            raise UserError("--device cuda: the Ray cluster has no GPU (use --device cpu)")
        workers = workers or num_gpus
        if workers > num_gpus:
            raise UserError(f"--workers {workers}: the Ray cluster has {num_gpus} GPU(s), one per worker",
                            exit_code=2)
        return ClusterSpec(num_workers=workers, use_gpu=True, cpus_per_worker=1)
    if workers is None or workers < 1:
        raise UserError("give the number of CPU workers (--workers N)", exit_code=2)
    if workers > num_cpus:
        raise UserError(f"--workers {workers}: the Ray cluster has {num_cpus} CPU(s), at least one per worker",
                        exit_code=2)
    return ClusterSpec(num_workers=workers, use_gpu=False, cpus_per_worker=cpus_per_worker or num_cpus // workers)
