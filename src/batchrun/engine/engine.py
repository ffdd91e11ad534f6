"""The step loop: schedule → build the step's batch → model forward with cascade attention → sample → hand
finished requests to the writer and free their KV.

The scheduler decides, the batch builder prepares on the host, the model runner runs the step on the device,
the finish rules say which requests end; this module wires them and keeps the run's counts.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from batchrun import defaults
from batchrun.attention import AttentionBackend, select_backend
from batchrun.engine.batch import BatchBuilder
from batchrun.engine.finish import FinishRules
from batchrun.engine.kv_cache import KVCache
from batchrun.engine.logits_processors import LogitsProcessors
from batchrun.engine.logprobs import LogprobsRecorder
from batchrun.engine.model_runner import ModelRunner
from batchrun.engine.request_state import RequestState
from batchrun.engine.sampler import Sampler
from batchrun.engine.scheduler import Scheduler, SchedulerConfig, Step
from batchrun.engine.structured import StructuredOutput
from batchrun.engine.transfer import step_results
from batchrun.kv_accounting import KVAccounting
from batchrun.model.llama import LlamaModel
from batchrun.output import Completion, FinishReason
from batchrun.requests import Request
from batchrun.tokenizer import token_bytes_of
from batchrun.tokens import TokenTable


class PlanLike(Protocol):
    """What the engine reads of `plan.Plan`."""

    requests: list[Request]
    tokens: TokenTable
    layout: Any  # planner.PlanLayout


class Writer(Protocol):
    """Where results go (output.OutputWriter, through progress.ProgressWriter); one call per finished sample."""

    def write_completion(self, request: Request, completion: Completion) -> bool | None: ...

    def write_error(self, record: Request, *, code: str | None = None, message: str | None = None
                    ) -> bool | None: ...


class Metrics(Protocol):
    def record_step(
        self,
        *,
        seconds: float,
        num_running: int,
        num_decode_tokens: int,
        num_prefill_tokens: int,
        kv_bytes: int,
        num_preempted: int,
    ) -> None: ...

    def close(
        self,
        *,
        wall_seconds: float,
        prompt_tokens: int,
        computed_prompt_tokens: int,
        output_tokens: int,
        peak_kv_bytes: int,
        num_preemptions: int,
    ) -> None: ...


@dataclass(frozen=True)
class RunSummary:
    num_completed: int
    num_failed: int
    num_steps: int
    prompt_tokens: int  # prompt tokens of the requests run (completed or failed)
    computed_prompt_tokens: int  # prompt tokens prefilled: each shared segment once, plus own parts
    output_tokens: int
    peak_kv_bytes: int  # the most KV memory the running work held at once
    wall_seconds: float  # first step to last
    num_preemptions: int = 0  # requests that lost their KV to make room and were recomputed


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
        reserve_max_tokens: bool = False,
    ) -> None:
        """`reserve_max_tokens`: admit by own prompt + max_tokens reserved up front (the rule before KV grew on
        demand; kept to measure against)."""
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan
        self.config = model.config
        self.kv_budget_bytes = kv_budget_bytes
        self.max_step_tokens = max_step_tokens
        self.reserve_max_tokens = reserve_max_tokens
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
        with torch.inference_mode(), _frozen_heap():
            return _Run(self, writer, metrics, skip_ids).loop()


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Moves every object alive before the run (the model, the plan, the tokenizer, imported modules: about
    300k) out of the cyclic collector's sight for the run: its full collections otherwise re-walk them (measured
    0.26 s of a 3.4 s run). Objects made during the run are collected as usual; the caller's heap is restored.
    No collection first: it would cost 0.12 s, and garbage already there only waits until the run ends."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
    num_preemptions: int = 0


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
            config=SchedulerConfig(num_slots=self._num_slots(kv, is_skipped), max_step_tokens=engine.max_step_tokens,
                                   reserve_max_tokens=engine.reserve_max_tokens),
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
        params = [r.sampling for r in self.requests]
        self.processors = LogitsProcessors(params, prompts=plan.tokens, device=engine.model.device)
        self.logprobs = LogprobsRecorder(params, token_bytes=token_bytes_of(engine.tokenizer))
        self.structured = StructuredOutput(params, tokenizer=engine.tokenizer, vocab_size=cfg.vocab_size,
                                           eos_token_ids=engine.eos_token_ids)

    def _num_slots(self, kv: KVAccounting, is_skipped: np.ndarray) -> int:
        """The budget in tokens, capped at what the plan could ever hold at once, every request at max_tokens
        (a small job on a large budget does not allocate the whole budget)."""
        by_budget = self.engine.kv_budget_bytes // self.engine.config.kv_bytes_per_token
        return int(min(by_budget, kv.request_tokens[~is_skipped].sum() + kv.node_tokens.sum()))

    # -- the loop ------------------------------------------------------------------------------------------

    def loop(self) -> RunSummary:
        start = t0 = time.perf_counter()
        while (step := self.scheduler.schedule()) is not None:
            self._admit(step)
            num_kv_tokens = self.scheduler.num_used  # the step's peak: before its finished requests free theirs
            if len(step.decode) or step.chunks:
                self._step(step)
            t1 = time.perf_counter()
            if self.metrics is not None:
                self.metrics.record_step(
                    seconds=t1 - t0,
                    num_running=self.scheduler.num_running,
                    num_decode_tokens=len(step.decode),
                    num_prefill_tokens=sum(c.end - c.start for c in step.chunks),
                    kv_bytes=num_kv_tokens * self.kv.bytes_per_token,
                    num_preempted=len(step.preempted),
                )
            t0 = t1
        assert self.kv.allocator.num_used == 0, "KV slots leaked"
        return self._close(time.perf_counter() - start)

    def _admit(self, step: Step) -> None:
        """Applies the step's frees, preemptions and admissions to the pool, then gives each decode row the
        slot its token is written to."""
        alloc, state = self.kv.allocator, self.state
        for n in step.freed_nodes:
            alloc.free(state.release_node(n))
        for r in step.preempted:
            alloc.free(state.preempt(r))  # its outputs, sampler stream and stop state carry on
        for r in step.rejected:
            self._fail(r, "kv_budget_exceeded", f"the request's prompt plus max_tokens need more KV memory than "
                       f"the budget of {self.engine.kv_budget_bytes} bytes holds (raise --kv-budget)")
        for n in step.admitted_nodes:
            state.hold_node(n, alloc.alloc(self.scheduler.node_tokens(n)))
        for r in step.admitted:
            state.hold_request(r, alloc.alloc(self.scheduler.own_tokens(r)))
        state.grow(step.decode, alloc.alloc(len(step.decode)))
        assert alloc.num_used == self.scheduler.num_used, "the pool holds what the scheduler counts"
        self.counts.num_preemptions += len(step.preempted)
        self.counts.peak_kv_tokens = max(self.counts.peak_kv_tokens, self.scheduler.num_used)

    def _step(self, step: Step) -> None:
        state, counts = self.state, self.counts
        batch = self.engine.builder.build(
            step,
            prompt_len=self.engine.prompt_len,
            num_generated=state.num_generated,
            last_token=state.last_token,
            output_ids=state.output_ids,
            request_slots=state.request_slots,
            node_slots=state.node_slots,
        )
        counts.num_steps += 1
        counts.computed_prompt_tokens += batch.num_prefill
        logits = self.runner.forward(batch)  # [M, V]
        requests = batch.logit_requests
        if len(requests) == 0:
            return
        is_nan = torch.isnan(logits).any(dim=-1)  # before the processors and sampling, which edit logits in place
        captured = self.logprobs.capture(logits, requests)  # the raw distribution, before any processor
        self.processors.apply(logits, requests, output_ids=state.output_ids)
        structured_rows = self.structured.apply(logits, requests)
        sampled = self.sampler.sample(logits, requests, state.num_generated[requests])
        tokens, is_nan = step_results(sampled, is_nan)  # the step's one device-to-host copy
        self.logprobs.record(captured, requests, tokens)
        self.structured.accept(requests, structured_rows[~is_nan[structured_rows]], tokens)
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
                num_preemptions=summary.num_preemptions,
            )
        return summary

    # -- finishing -----------------------------------------------------------------------------------------

    def _complete(self, r: int, reason: FinishReason) -> None:
        ids = self.state.output_ids[r]
        completion = Completion(token_ids=list(ids), text=self.finish.text(r, ids), finish_reason=reason,
                                prompt_tokens=int(self.engine.prompt_len[r]), logprobs=self.logprobs.take(r))
        self.writer.write_completion(self.requests[r], completion)
        self.counts.num_completed += 1
        self._release(r)

    def _fail(self, r: int, code: str, message: str) -> None:
        self.writer.write_error(self.requests[r], code=code, message=message)
        self.counts.num_failed += 1
        if self.state.is_admitted(r):  # free what it holds
            self._release(r)

    def _release(self, r: int) -> None:
        self.counts.prompt_tokens += int(self.engine.prompt_len[r])
        alloc = self.kv.allocator
        alloc.free(self.state.release_request(r))
        for n in self.scheduler.finish(r):
            alloc.free(self.state.release_node(n))
        self.sampler.release(r)
        self.processors.release(r)
        self.logprobs.release(r)
        self.structured.release(r)


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
