"""The step loop: schedule → build the step's batch and attention metadata → model forward with cascade
attention → sample → hand finished requests to the writer and free their KV.

The only engine module that touches the device; the scheduler decides, the batch builder prepares on the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from batchrun import defaults
from batchrun.attention import AttentionBackend, select_backend
from batchrun.engine.batch import BatchBuilder, StepBatch
from batchrun.engine.kv_cache import KVCache
from batchrun.engine.sampler import Sampler, StopChecker
from batchrun.engine.scheduler import Scheduler, SchedulerConfig, Step
from batchrun.kv_accounting import KVAccounting
from batchrun.model.llama import LlamaModel
from batchrun.output import Completion
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
        self.builder = BatchBuilder(tokens=plan.tokens, forest=layout.forest, node_request=layout.node_request)

    def run(self, writer: Writer, metrics: Metrics | None = None, skip_ids: set[str] | frozenset[str] = frozenset()
            ) -> RunSummary:
        """Runs every request whose id is not in `skip_ids` (already written: resume); hands each finished
        request to `writer` as soon as it finishes. A request that cannot run becomes an error line; an
        exception inside a step (a bug, out of memory) propagates."""
        with torch.inference_mode():
            return _Run(self, writer, metrics, skip_ids).loop()


class _Run:
    """The state of one `Engine.run`: per-request arrays indexed by request id (plan row)."""

    def __init__(self, engine: Engine, writer: Writer, metrics: Metrics | None, skip_ids: set[str] | frozenset[str]
                 ) -> None:
        self.engine, self.writer, self.metrics = engine, writer, metrics
        plan, cfg = engine.plan, engine.config
        self.requests = plan.requests
        num_requests = len(self.requests)
        self.min_tokens = np.array([r.sampling.min_tokens for r in self.requests], np.int64)
        self.num_generated = np.zeros(num_requests, np.int64)
        self.last_token = np.zeros(num_requests, np.int64)
        self.output_ids: list[list[int]] = [[] for _ in range(num_requests)]
        self.request_slots: list[np.ndarray | None] = [None] * num_requests
        self.node_slots: list[np.ndarray | None] = [None] * len(plan.layout.node_len)
        self.num_completed = self.num_failed = self.num_steps = 0
        self.prompt_tokens = self.computed_prompt_tokens = self.output_tokens = 0
        self.peak_kv_tokens = 0
        is_skipped = np.array([r.id in skip_ids for r in self.requests], bool)
        # The plan was checked against the context when made; a plan run with another model may not fit.
        is_too_long = ~is_skipped & (engine.prompt_len + engine.max_tokens > cfg.max_position_embeddings)
        for r in np.flatnonzero(is_too_long).tolist():
            self._fail(r, "context_length_exceeded", f"{engine.prompt_len[r]} prompt tokens plus max_tokens "
                       f"{engine.max_tokens[r]} exceed the model's context of {cfg.max_position_embeddings}")
        is_skipped |= is_too_long
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
        self.sampler = Sampler(
            [r.sampling for r in self.requests],
            eos_token_ids=engine.eos_token_ids,
            seed=engine.seed,
            device=engine.model.device,
        )
        eos = frozenset(engine.eos_token_ids)
        self.stop_checkers = {
            r: StopChecker(req.sampling, eos_token_ids=eos) for r, req in enumerate(self.requests) if req.sampling.stop
        }
        self.has_stop = np.array([bool(r.sampling.stop) for r in self.requests], bool)
        self.eos = np.array(sorted(eos), np.int64)

    def _num_slots(self, kv: KVAccounting, is_skipped: np.ndarray) -> int:
        """The budget in tokens, capped at what the plan could ever hold at once (a small job on a large
        budget does not allocate the whole budget)."""
        by_budget = self.engine.kv_budget_bytes // self.engine.config.kv_bytes_per_token
        return int(min(by_budget, kv.request_tokens[~is_skipped].sum() + kv.node_tokens.sum()))

    # -- the loop ------------------------------------------------------------------------------------------

    def loop(self) -> RunSummary:
        start = t0 = time.perf_counter()
        while (step := self.scheduler.schedule()) is not None:
            self._apply_admission(step)
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
        wall = time.perf_counter() - start
        summary = RunSummary(
            num_completed=self.num_completed,
            num_failed=self.num_failed,
            num_steps=self.num_steps,
            prompt_tokens=self.prompt_tokens,
            computed_prompt_tokens=self.computed_prompt_tokens,
            output_tokens=self.output_tokens,
            peak_kv_bytes=self.peak_kv_tokens * self.kv.bytes_per_token,
            wall_seconds=wall,
        )
        if self.metrics is not None:
            self.metrics.close(
                wall_seconds=wall,
                prompt_tokens=summary.prompt_tokens,
                computed_prompt_tokens=summary.computed_prompt_tokens,
                output_tokens=summary.output_tokens,
                peak_kv_bytes=summary.peak_kv_bytes,
            )
        return summary

    def _apply_admission(self, step: Step) -> None:
        alloc = self.kv.allocator
        for n in step.freed_nodes:
            alloc.free(self._take_node_slots(n))
        for r in step.rejected:
            self._fail(r, "kv_budget_exceeded", f"the request needs more KV memory than the budget of "
                       f"{self.engine.kv_budget_bytes} bytes holds (raise --kv-budget)")
        for n in step.admitted_nodes:
            self.node_slots[n] = alloc.alloc(self.scheduler.node_tokens(n))
        for r in step.admitted:
            self.request_slots[r] = alloc.alloc(self.scheduler.request_tokens(r))
            self.prompt_tokens += int(self.engine.prompt_len[r])
        self.peak_kv_tokens = max(self.peak_kv_tokens, self.scheduler.num_reserved)

    def _step(self, step: Step) -> None:
        batch = self.engine.builder.build(
            step,
            prompt_len=self.engine.prompt_len,
            num_generated=self.num_generated,
            last_token=self.last_token,
            request_slots=self.request_slots,
            node_slots=self.node_slots,
        )
        self.num_steps += 1
        self.computed_prompt_tokens += batch.num_prefill
        logits = self._forward(batch)  # [M, V]
        requests = batch.logit_requests
        if len(requests) == 0:
            return
        is_bad = torch.isnan(logits).any(dim=-1).cpu().numpy()
        tokens = self.sampler.sample(logits, requests, self.num_generated[requests])
        self._append(requests, tokens, is_bad)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        """Runs the model over the step's rows and returns float32 logits [M, V] of the sampled rows."""
        engine, device = self.engine, self.engine.model.device
        backend, kv, sm_scale = engine.backend, self.kv, engine.model.sm_scale
        group = self.engine.config.num_heads // self.engine.config.num_kv_heads
        own_plan = backend.plan_own(
            q_indptr=batch.q_indptr, kv_indices=batch.kv_indices, kv_indptr=batch.kv_indptr, group=group
        )
        prefix_plans = [
            (
                backend.plan_prefix(
                    q_start=p.q_start, q_len=p.q_len, kv_indices=p.kv_indices, kv_indptr=p.kv_indptr, group=group
                ),
                p.rows if isinstance(p.rows, slice) else _device(p.rows, device),
            )
            for p in batch.prefix
        ]
        slots = _device(batch.slots, device)

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q [N, Hq, D], k/v [N, Hkv, D] (post-RoPE) → o [N, Hq, D]
            kv.write(layer, slots, k, v)
            k_cache, v_cache = kv.layer(layer)
            o, lse = backend.own(own_plan, q, k_cache, v_cache, sm_scale=sm_scale)
            for plan, rows in prefix_plans:
                o_p, lse_p = backend.prefix(plan, q, k_cache, v_cache, sm_scale=sm_scale)
                backend.merge_state_into(o, lse, o_p, lse_p, rows=rows)
            return o

        hidden = engine.model.forward(_device(batch.input_ids, device), _device(batch.positions, device), attention)
        return engine.model.compute_logits(hidden.index_select(0, _device(batch.logit_rows, device)))

    # -- finishing -----------------------------------------------------------------------------------------

    def _append(self, requests: np.ndarray, tokens: np.ndarray, is_bad: np.ndarray) -> None:
        self.num_generated[requests] += 1
        self.last_token[requests] = tokens
        self.output_tokens += len(requests)
        for r, t in zip(requests.tolist(), tokens.tolist(), strict=True):
            self.output_ids[r].append(t)
        # The finish rules, vectorised; only finishing rows and rows with stop strings reach Python.
        num = self.num_generated[requests]
        is_eos = np.isin(tokens, self.eos) & (num >= self.min_tokens[requests])
        is_length = num >= self.engine.max_tokens[requests]
        for i in np.flatnonzero(is_bad).tolist():
            self._fail(int(requests[i]), "nan_logits", "the model produced NaN logits for this request")
        has_stop = self.has_stop[requests] & ~is_bad
        for i in np.flatnonzero(has_stop).tolist():
            r = int(requests[i])
            reason = self.stop_checkers[r].check(self.output_ids[r], self._decode)
            if reason is not None:
                self._complete(r, reason)
        for i in np.flatnonzero((is_eos | is_length) & ~has_stop & ~is_bad).tolist():
            self._complete(int(requests[i]), "stop" if is_eos[i] else "length")

    def _decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def _complete(self, r: int, reason: str) -> None:
        ids = self.output_ids[r]
        text = self._decode(ids)
        checker = self.stop_checkers.get(r)
        if checker is not None:
            text = checker.final_text(text)
        completion = Completion(token_ids=list(ids), text=text, finish_reason=reason,  # type: ignore[arg-type]
                                prompt_tokens=int(self.engine.prompt_len[r]))
        self.writer.write_completion(self.requests[r], completion)
        self.num_completed += 1
        self._release(r)

    def _fail(self, r: int, code: str, message: str) -> None:
        self.writer.write_error(self.requests[r], code=code, message=message)
        self.num_failed += 1
        if self.request_slots[r] is not None:  # admitted: free what it holds
            self._release(r)

    def _release(self, r: int) -> None:
        alloc = self.kv.allocator
        slots = self.request_slots[r]
        assert slots is not None
        alloc.free(slots)
        self.request_slots[r] = None
        for n in self.scheduler.finish(r):
            alloc.free(self._take_node_slots(n))
        self.sampler.release(r)
        self.output_ids[r] = []

    def _take_node_slots(self, n: int) -> np.ndarray:
        slots = self.node_slots[n]
        assert slots is not None, f"node {n} freed twice"
        self.node_slots[n] = None
        return slots


def _device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(a).to(device, non_blocking=True)
