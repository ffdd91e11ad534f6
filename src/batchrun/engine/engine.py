"""The step loop: schedule → build the step's batch → model forward with cascade attention → sample → hand
finished requests to the writer and free their KV.

The scheduler decides, the batch builder prepares on the host, the model runner runs the step on the device,
the finish rules say which requests end; this module wires them and keeps the run's counts.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from batchrun import defaults
from batchrun.attention import AttentionBackend, select_backend
from batchrun.engine.batch import BatchBuilder
from batchrun.engine.finish import FinishRules
from batchrun.engine.kv_cache import KVCache
from batchrun.engine.model_runner import ModelRunner, nan_rows
from batchrun.engine.request_state import RequestState
from batchrun.engine.sampler import Sampler
from batchrun.engine.scheduler import Scheduler, SchedulerConfig, Step
from batchrun.kv_accounting import KVAccounting
from batchrun.model.llama import LlamaModel
from batchrun.output import Completion, FinishReason
from batchrun.requests import Request
from batchrun.tokens import TokenTable


class PlanLike(Protocol):
    """What the engine reads of `plan.Plan`."""

    requests: list[Request]
    tokens: TokenTable
    layout: Any  # planner.PlanLayout


class Writer(Protocol):
    def write_completion(self, request: Request, completion: Completion) -> None: ...

    def write_error(self, record: Request, *, code: str | None = None, message: str | None = None) -> None: ...


class Metrics(Protocol):
    def record_step(
        self, *, seconds: float, num_running: int, num_decode_tokens: int, num_prefill_tokens: int, kv_bytes: int
    ) -> None: ...

    def close(
        self,
        *,
        wall_seconds: float,
        prompt_tokens: int,
        computed_prompt_tokens: int,
        output_tokens: int,
        peak_kv_bytes: int,
    ) -> None: ...


@dataclass(frozen=True)
class RunSummary:
    num_completed: int
    num_failed: int
    num_steps: int
    prompt_tokens: int  # prompt tokens of the requests run (completed or failed)
    computed_prompt_tokens: int  # prompt tokens prefilled: each shared segment once, plus own parts
    output_tokens: int
    peak_kv_bytes: int  # the most KV memory the admitted work held at once
    wall_seconds: float  # first step to last


class Engine:
    """Runs a plan's requests with `model` under a KV budget; see `run`."""

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Any,
        plan: PlanLike,
        *,
        kv_budget_bytes: int,
        max_step_tokens: int = defaults.MAX_STEP_TOKENS,
        backend: AttentionBackend | None = None,
        seed: int = defaults.RUN_SEED,
        eos_token_ids: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan
        self.config = model.config
        self.kv_budget_bytes = kv_budget_bytes
        self.max_step_tokens = max_step_tokens
        self.backend = backend or select_backend(model.device)
        self.seed = seed
        self.eos_token_ids = tuple(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        layout = plan.layout
        self.prompt_len = plan.tokens.lengths.astype(np.int64)
        self.max_tokens = np.array([r.sampling.max_tokens for r in plan.requests], np.int64)
        self.builder = BatchBuilder(tokens=plan.tokens, forest=layout.forest, node_request=layout.node_request,
                                    gqa_ratio=model.config.num_heads // model.config.num_kv_heads)

    def run(self, writer: Writer, metrics: Metrics | None = None, skip_ids: set[str] | frozenset[str] = frozenset()
            ) -> RunSummary:
        """Runs every request whose id is not in `skip_ids` (already written: resume); hands each finished
        request to `writer` as soon as it finishes. A request that cannot run becomes an error line; an
        exception inside a step (a bug, out of memory) propagates."""
        with torch.inference_mode():
            return _Run(self, writer, metrics, skip_ids).loop()


@dataclass
class _Counts:
    """What a run has done so far: RunSummary's counts, with the peak KV in slots."""

    num_completed: int = 0
    num_failed: int = 0
    num_steps: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    output_tokens: int = 0
    peak_kv_tokens: int = 0


class _Run:
    """One `Engine.run`: the scheduler, the KV pool, the model runner, the sampler, the finish rules and the
    per-request state, driven step by step."""

    def __init__(self, engine: Engine, writer: Writer, metrics: Metrics | None, skip_ids: set[str] | frozenset[str]
                 ) -> None:
        self.engine, self.writer, self.metrics = engine, writer, metrics
        plan, cfg = engine.plan, engine.config
        self.requests = plan.requests
        self.state = RequestState(num_requests=len(self.requests), num_nodes=len(plan.layout.node_len))
        self.counts = _Counts()
        is_skipped = np.array([r.id in skip_ids for r in self.requests], bool)
        too_long = _context_errors(engine, is_skipped)
        for r, message in too_long.items():
            self._fail(r, "context_length_exceeded", message)
        is_skipped[list(too_long)] = True
        layout = plan.layout
        kv = KVAccounting(layout.forest, prompt_len=engine.prompt_len, max_tokens=engine.max_tokens)
        self.scheduler = Scheduler(
            kv=kv,
            order=layout.order,
            is_skipped=is_skipped,
            config=SchedulerConfig(num_slots=self._num_slots(kv, is_skipped), max_step_tokens=engine.max_step_tokens),
        )
        self.kv = KVCache(
            num_layers=cfg.num_layers,
            num_slots=self.scheduler.config.num_slots,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=engine.model.dtype,
            device=engine.model.device,
        )
        assert self.kv.bytes_per_token == cfg.kv_bytes_per_token, "the KV pool and the plan count bytes alike"
        self.runner = ModelRunner(engine.model, engine.backend, self.kv)
        self.sampler = Sampler(
            [r.sampling for r in self.requests],
            eos_token_ids=engine.eos_token_ids,
            seed=engine.seed,
            device=engine.model.device,
        )
        self.finish = FinishRules(
            [r.sampling for r in self.requests],
            eos_token_ids=engine.eos_token_ids,
            decode=functools.partial(engine.tokenizer.decode, skip_special_tokens=True),
        )

    def _num_slots(self, kv: KVAccounting, is_skipped: np.ndarray) -> int:
        """The budget in tokens, capped at what the plan could ever hold at once (a small job on a large
        budget does not allocate the whole budget)."""
        by_budget = self.engine.kv_budget_bytes // self.engine.config.kv_bytes_per_token
        return int(min(by_budget, kv.request_tokens[~is_skipped].sum() + kv.node_tokens.sum()))

    # -- the loop ------------------------------------------------------------------------------------------

    def loop(self) -> RunSummary:
        start = t0 = time.perf_counter()
        while (step := self.scheduler.schedule()) is not None:
            self._admit(step)
            if len(step.decode) or step.chunks:
                self._step(step)
            t1 = time.perf_counter()
            if self.metrics is not None:
                self.metrics.record_step(
                    seconds=t1 - t0,
                    num_running=self.scheduler.num_running,
                    num_decode_tokens=len(step.decode),
                    num_prefill_tokens=sum(c.end - c.start for c in step.chunks),
                    kv_bytes=self.scheduler.num_reserved * self.kv.bytes_per_token,
                )
            t0 = t1
        assert self.kv.allocator.num_used == 0, "KV slots leaked"
        return self._close(time.perf_counter() - start)

    def _admit(self, step: Step) -> None:
        alloc, state = self.kv.allocator, self.state
        for n in step.freed_nodes:
            alloc.free(state.release_node(n))
        for r in step.rejected:
            self._fail(r, "kv_budget_exceeded", f"the request needs more KV memory than the budget of "
                       f"{self.engine.kv_budget_bytes} bytes holds (raise --kv-budget)")
        for n in step.admitted_nodes:
            state.hold_node(n, alloc.alloc(self.scheduler.node_tokens(n)))
        for r in step.admitted:
            state.hold_request(r, alloc.alloc(self.scheduler.request_tokens(r)))
            self.counts.prompt_tokens += int(self.engine.prompt_len[r])
        self.counts.peak_kv_tokens = max(self.counts.peak_kv_tokens, self.scheduler.num_reserved)

    def _step(self, step: Step) -> None:
        state, counts = self.state, self.counts
        batch = self.engine.builder.build(
            step,
            prompt_len=self.engine.prompt_len,
            num_generated=state.num_generated,
            last_token=state.last_token,
            request_slots=state.request_slots,
            node_slots=state.node_slots,
        )
        counts.num_steps += 1
        counts.computed_prompt_tokens += batch.num_prefill
        logits = self.runner.forward(batch)  # [M, V]
        requests = batch.logit_requests
        if len(requests) == 0:
            return
        is_nan = nan_rows(logits)
        tokens = self.sampler.sample(logits, requests, state.num_generated[requests])
        state.append(requests, tokens)
        counts.output_tokens += len(requests)
        finishes = self.finish.check(
            requests, tokens, num_generated=state.num_generated[requests], output_ids=state.output_ids, is_nan=is_nan
        )
        for r in finishes.nan_requests:
            self._fail(r, "nan_logits", "the model produced NaN logits for this request")
        for r, reason in finishes.finished:
            self._complete(r, reason)

    def _close(self, wall: float) -> RunSummary:
        counts = asdict(self.counts)
        peak_kv_bytes = counts.pop("peak_kv_tokens") * self.kv.bytes_per_token
        summary = RunSummary(**counts, peak_kv_bytes=peak_kv_bytes, wall_seconds=wall)
        if self.metrics is not None:
            self.metrics.close(
                wall_seconds=wall,
                prompt_tokens=summary.prompt_tokens,
                computed_prompt_tokens=summary.computed_prompt_tokens,
                output_tokens=summary.output_tokens,
                peak_kv_bytes=summary.peak_kv_bytes,
            )
        return summary

    # -- finishing -----------------------------------------------------------------------------------------

    def _complete(self, r: int, reason: FinishReason) -> None:
        ids = self.state.output_ids[r]
        completion = Completion(token_ids=list(ids), text=self.finish.text(r, ids), finish_reason=reason,
                                prompt_tokens=int(self.engine.prompt_len[r]))
        self.writer.write_completion(self.requests[r], completion)
        self.counts.num_completed += 1
        self._release(r)

    def _fail(self, r: int, code: str, message: str) -> None:
        self.writer.write_error(self.requests[r], code=code, message=message)
        self.counts.num_failed += 1
        if self.state.is_admitted(r):  # free what it holds
            self._release(r)

    def _release(self, r: int) -> None:
        alloc = self.kv.allocator
        alloc.free(self.state.release_request(r))
        for n in self.scheduler.finish(r):
            alloc.free(self.state.release_node(n))
        self.sampler.release(r)


def _context_errors(engine: Engine, is_skipped: np.ndarray) -> dict[int, str]:
    """The requests to run whose prompt plus max_tokens exceed the model's context, with their error messages.
    The plan was checked against the context when made; a plan run with another model may not fit."""
    context = engine.config.max_position_embeddings
    is_too_long = ~is_skipped & (engine.prompt_len + engine.max_tokens > context)
    return {
        r: f"{engine.prompt_len[r]} prompt tokens plus max_tokens {engine.max_tokens[r]} exceed the model's "
        f"context of {context}"
        for r in np.flatnonzero(is_too_long).tolist()
    }
