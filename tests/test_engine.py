"""THE ORACLE: greedy fp32 runs of the engine (plan → scheduler → cascade attention → sampler) give the same
tokens as transformers' `generate` on the same random-weight checkpoint, request by request (unbatched), over
workloads with single- and multi-level sharing, no sharing, one-request groups, a prompt that is the prefix of
another, identical prompts, min_tokens with an EOS, stop strings, a KV budget that forces waves, and one that
forces preemption. Also: resume (skip_ids), run-time failures, seeded sampling independent of the batch and of
preemption, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from batchrun.engine.engine import Engine, RunSummary
from batchrun.model.loader import load_model
from batchrun.model.spec import resolve_model
from batchrun.planner import PlannerConfig, plan_requests
from batchrun.requests import Request, SamplingParams
from batchrun.tokenizer import load_tokenizer
from batchrun.tokens import TokenTable
from checkpoints import make_checkpoint

CPU = torch.device("cpu")
VOCAB = 4096
BOS = 0


@dataclass
class Plan:
    requests: list[Request]
    tokens: TokenTable
    layout: object


@dataclass
class FakeWriter:
    completions: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    def write_completion(self, request, completion):
        assert request.id not in self.completions and request.id not in self.errors
        self.completions[request.id] = completion

    def write_error(self, record, *, code=None, message=None):
        assert record.id not in self.completions and record.id not in self.errors
        self.errors[record.id] = (code, message)


@dataclass
class FakeMetrics:
    steps: list = field(default_factory=list)
    summary: dict | None = None

    def record_step(self, **kw):
        self.steps.append(kw)

    def close(self, **kw):
        assert self.summary is None
        self.summary = kw


@dataclass
class Job:
    prompts: list[list[int]]
    params: list[SamplingParams]
    eos: int  # the EOS id the job runs with (the engine's override and generate's eos_token_id)


class Checkpoint:
    """Our model and transformers' over one random-weight checkpoint, with memoised reference generations."""

    def __init__(self, path):
        self.spec = resolve_model(str(path))
        self.model = load_model(self.spec, device=CPU)
        self.tokenizer = load_tokenizer(self.spec)
        self.hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        self.hf.generation_config.eos_token_id = None
        self._cache: dict = {}

    def reference(self, prompt: list[int], params: SamplingParams, eos: int | None) -> list[int]:
        key = (tuple(prompt), params.max_tokens, params.min_tokens, eos)
        if key not in self._cache:
            kw = dict(eos_token_id=eos) if eos is not None else {}
            ids = torch.tensor([prompt])
            out = self.hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                min_new_tokens=params.min_tokens or None, do_sample=False, pad_token_id=VOCAB - 1, **kw,
            )
            self._cache[key] = out[0, len(prompt):].tolist()
        return self._cache[key]

    def expected(self, prompt: list[int], params: SamplingParams, eos: int) -> tuple[list[int], str, str]:
        """(token ids, text, finish_reason) by the rules applied to transformers' greedy tokens."""
        ref = self.reference(prompt, params, eos)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        for k in range(1, len(ref) + 1):
            if k < params.min_tokens:
                continue
            if ref[k - 1] == eos:
                return ref[:k], decode(ref[:k]), "stop"
            text = decode(ref[:k])
            hits = [i for s in params.stop if (i := text.find(s)) >= 0]
            if hits:
                return ref[:k], text[: min(hits)], "stop"
        assert len(ref) == params.max_tokens
        return ref, decode(ref), "length"


_CHECKPOINTS: dict = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    def get(arch: str) -> Checkpoint:
        if arch not in _CHECKPOINTS:
            _CHECKPOINTS[arch] = Checkpoint(make_checkpoint(tmp_path_factory.mktemp(arch), arch))
        return _CHECKPOINTS[arch]

    return get


def _rand(rng, n):
    return rng.integers(2, VOCAB, int(n)).tolist()


def make_job(ck: Checkpoint, seed: int, *, with_eos: bool) -> Job:
    """System prompt → documents → questions (multi-level, some one-request groups), a single-level group,
    unshared prompts, a prompt that is the prefix of another, identical prompts; varied max/min_tokens."""
    rng = np.random.default_rng(seed)
    system = [BOS] + _rand(rng, 20)
    prompts = []
    for _ in range(3):
        doc = _rand(rng, rng.integers(8, 20))
        for _ in range(int(rng.integers(1, 4))):
            prompts.append(system + doc + _rand(rng, rng.integers(1, 6)))
    other = [BOS] + _rand(rng, 25)
    prompts += [other + _rand(rng, rng.integers(1, 8)) for _ in range(4)]
    prompts += [[BOS] + _rand(rng, rng.integers(2, 30)) for _ in range(3)]
    base = [BOS] + _rand(rng, 30)
    prompts += [base, base[:18], list(base), list(base)]
    max_tokens = rng.integers(1, 12, len(prompts))
    min_tokens = np.minimum(rng.integers(0, 5, len(prompts)), max_tokens) * (with_eos & (np.arange(len(prompts)) % 2))
    params = [SamplingParams(max_tokens=int(m), min_tokens=int(k), temperature=0.0)
              for m, k in zip(max_tokens, min_tokens, strict=True)]
    eos = 1
    if with_eos:
        # An EOS the model actually produces: the third greedy token of the first prompt.
        eos = ck.reference(prompts[0], SamplingParams(max_tokens=3, temperature=0.0), None)[2]
        params[0] = SamplingParams(max_tokens=8, temperature=0.0)  # stops at token 3 with "stop"
        params[1] = SamplingParams(max_tokens=8, min_tokens=5, temperature=0.0)
        prompts[1] = prompts[0]
    return Job(prompts, params, eos)


def build_plan(job: Job, *, kv_bytes_per_token: int, kv_budget_bytes: int = 1 << 30, min_prefix_len: int = 4,
               share: bool = True) -> Plan:
    tokens = TokenTable.from_lists(job.prompts)
    requests = [Request(line=i + 1, id=f"r{i}", format="plain", endpoint="completions", sampling=p)
                for i, p in enumerate(job.params)]
    max_tokens = np.array([p.max_tokens for p in job.params])
    config = PlannerConfig(kv_budget_bytes=kv_budget_bytes, min_prefix_len=min_prefix_len, max_levels=3, share=share)
    layout = plan_requests(tokens, max_tokens, kv_bytes_per_token=kv_bytes_per_token, config=config)
    return Plan(requests, tokens, layout)


def seeded_job(ck: Checkpoint, seed: int, *, first_seed: int, **sampling) -> tuple[Job, Plan]:
    """make_job's prompts, each request sampled with its own seed (first_seed, first_seed + 1, ...)."""
    prompts = make_job(ck, seed, with_eos=False).prompts
    job = Job(prompts, [SamplingParams(**sampling, seed=first_seed + i) for i in range(len(prompts))], 1)
    return job, build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)


def run(ck: Checkpoint, plan: Plan, job: Job, *, skip_ids=frozenset(), metrics=None, **kw):
    writer = FakeWriter()
    engine = Engine(ck.model, ck.tokenizer, plan, eos_token_ids=(job.eos,), **kw)
    summary = engine.run(writer, metrics, skip_ids=set(skip_ids))
    return writer, summary


def assert_matches_transformers(ck: Checkpoint, job: Job, writer: FakeWriter, skip_ids=frozenset()):
    assert not writer.errors
    for i, (prompt, params) in enumerate(zip(job.prompts, job.params, strict=True)):
        rid = f"r{i}"
        if rid in skip_ids:
            assert rid not in writer.completions
            continue
        ids, text, reason = ck.expected(prompt, params, job.eos)
        got = writer.completions[rid]
        assert got.token_ids == ids, f"{rid}: prompt {len(prompt)} tokens, {params}"
        assert (got.text, got.finish_reason, got.prompt_tokens) == (text, reason, len(prompt)), rid


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama-tied", "llama3-rope"])
def test_greedy_matches_transformers(checkpoints, arch):
    ck = checkpoints(arch)
    for seed, with_eos in ((0, False), (1, True)):
        job = make_job(ck, seed, with_eos=with_eos)
        plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)
        assert plan.layout.num_levels >= 2 and plan.layout.saved_prefill_tokens > 0
        writer, summary = run(ck, plan, job, kv_budget_bytes=1 << 30)
        assert_matches_transformers(ck, job, writer)
        assert summary.computed_prompt_tokens == plan.layout.prefill_tokens
        assert summary.num_completed == len(job.prompts)
        if with_eos:
            assert writer.completions["r0"].finish_reason == "stop" and len(writer.completions["r0"].token_ids) == 3
            assert len(writer.completions["r1"].token_ids) >= 5


# bf16 rounds differently in every implementation: batchrun's tokens may leave transformers' only where the
# two best logits are this close (a share of the largest |logit|; both models' logits agree within 3% of it,
# so a flip needs a margin within 6%).
BF16_TIE_MARGIN = 0.06


def test_bfloat16_agrees_with_transformers_bfloat16(checkpoints):
    """bf16 greedy tokens against transformers' bf16 generate: the share identical is reported; where a request
    diverges, transformers' own logits at the first divergence must be a near-tie."""
    ck = checkpoints("llama")
    model = load_model(ck.spec, device=CPU, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(str(ck.spec.path), dtype=torch.bfloat16)
    job = make_job(ck, 0, with_eos=False)
    plan = build_plan(job, kv_bytes_per_token=model.config.kv_bytes_per_token)
    writer = FakeWriter()
    Engine(model, ck.tokenizer, plan, kv_budget_bytes=1 << 30, eos_token_ids=(job.eos,)).run(writer, None)
    num_same, margins = 0, []
    for i, (prompt, params) in enumerate(zip(job.prompts, job.params, strict=True)):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=VOCAB - 1)[0, len(prompt):].tolist()
        got = writer.completions[f"r{i}"].token_ids
        if got == ref[: len(got)] and (len(got) == len(ref) or got[-1] == job.eos):
            num_same += 1
            continue
        k = next(j for j, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b)
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + ref[:k]])).logits[0, -1].float()
        margins.append(float(logits[ref[k]] - logits[got[k]]) / float(logits.abs().max()))
    print(f"bf16: {num_same}/{len(job.prompts)} requests identical to transformers' bf16; margins at the first "
          f"divergence (share of max |logit|): {[round(m, 4) for m in margins]}")
    assert all(0 <= m < BF16_TIE_MARGIN for m in margins), margins
    # transformers' bf16 logits are themselves rounded to bf16 (a unit is ~0.4-0.8% of their largest value on
    # this model), so ties are common: the margins above are the test, the share only a floor.
    assert num_same >= len(job.prompts) // 3


def test_small_kv_budget_runs_in_waves_with_chunked_prefill(checkpoints):
    ck = checkpoints("llama")
    job = make_job(ck, 1, with_eos=True)
    bytes_per_token = ck.model.config.kv_bytes_per_token
    longest = max(len(p) + s.max_tokens for p, s in zip(job.prompts, job.params, strict=True))
    budget = (longest + 8) * bytes_per_token
    plan = build_plan(job, kv_bytes_per_token=bytes_per_token, kv_budget_bytes=budget)
    metrics = FakeMetrics()
    writer, summary = run(ck, plan, job, kv_budget_bytes=budget, max_step_tokens=16, metrics=metrics)
    assert_matches_transformers(ck, job, writer)
    assert summary.peak_kv_bytes <= budget
    assert max(s["kv_bytes"] for s in metrics.steps) <= budget
    # Continuous admission: several requests ran at once, but never all of them.
    assert 1 < max(s["num_running"] for s in metrics.steps) < len(job.prompts)
    assert all(s["num_decode_tokens"] + s["num_prefill_tokens"] <= max(16, s["num_decode_tokens"])
               for s in metrics.steps)
    assert metrics.summary["output_tokens"] == summary.output_tokens == sum(
        len(c.token_ids) for c in writer.completions.values())
    # Shared nodes stay resident across waves, so each is still computed once.
    assert summary.computed_prompt_tokens == plan.layout.prefill_tokens


def tight_budget(ck: Checkpoint, job: Job, *, slack: int) -> int:
    """A KV budget that holds the longest request at max_tokens plus `slack` tokens: the others must share."""
    longest = max(len(p) + s.max_tokens for p, s in zip(job.prompts, job.params, strict=True))
    return (longest + slack) * ck.model.config.kv_bytes_per_token


@pytest.mark.parametrize(("seed", "with_eos"), [(0, False), (2, True), (3, True)])
def test_preemption_never_changes_greedy_outputs(checkpoints, seed, with_eos):
    ck = checkpoints("llama")
    job = make_job(ck, seed, with_eos=with_eos)
    plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)  # planned on a large budget
    budget = tight_budget(ck, job, slack=0)
    metrics = FakeMetrics()
    writer, summary = run(ck, plan, job, kv_budget_bytes=budget, max_step_tokens=16, metrics=metrics)
    assert summary.num_preemptions > 0
    assert sum(s["num_preempted"] for s in metrics.steps) == summary.num_preemptions
    assert_matches_transformers(ck, job, writer)
    assert max(s["kv_bytes"] for s in metrics.steps) == summary.peak_kv_bytes <= budget
    # A preempted request recomputes its own prompt and what it had generated; shared nodes stay resident.
    assert summary.computed_prompt_tokens > plan.layout.prefill_tokens
    assert summary.prompt_tokens == plan.layout.prompt_tokens


def test_preemption_keeps_each_seeded_stream_and_reservation_never_preempts(checkpoints):
    ck = checkpoints("llama")
    job, plan = seeded_job(ck, 4, first_seed=7, max_tokens=12, temperature=0.8, top_k=50)
    budget = tight_budget(ck, job, slack=6)
    free, _ = run(ck, plan, job, kv_budget_bytes=1 << 30)
    metrics = {False: FakeMetrics(), True: FakeMetrics()}
    for reserve in (False, True):
        tight, summary = run(ck, plan, job, kv_budget_bytes=budget, metrics=metrics[reserve],
                             reserve_max_tokens=reserve)
        assert (summary.num_preemptions > 0) == (not reserve)
        assert {k: c.token_ids for k, c in tight.completions.items()} == {
            k: c.token_ids for k, c in free.completions.items()}
    # Growing KV runs more requests at once than reserving max_tokens does, in the same memory.
    peak = {reserve: max(s["num_running"] for s in m.steps) for reserve, m in metrics.items()}
    assert peak[False] > peak[True]


def test_no_sharing_plan_gives_the_same_tokens(checkpoints):
    ck = checkpoints("qwen2")
    job = make_job(ck, 0, with_eos=False)
    plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token, share=False)
    assert len(plan.layout.node_len) == 0
    writer, summary = run(ck, plan, job, kv_budget_bytes=1 << 30, max_step_tokens=40)
    assert_matches_transformers(ck, job, writer)
    assert summary.computed_prompt_tokens == summary.prompt_tokens


def test_stop_strings(checkpoints):
    ck = checkpoints("llama")
    job = make_job(ck, 2, with_eos=False)
    # Stop strings taken from each reference output's text, so that they do occur.
    params = []
    for prompt, p in zip(job.prompts, job.params, strict=True):
        p = SamplingParams(max_tokens=10, temperature=0.0)
        text = ck.tokenizer.decode(ck.reference(prompt, p, 1), skip_special_tokens=True)
        stop = text[len(text) // 2 : len(text) // 2 + 2].strip() or "zzzz"
        params.append(SamplingParams(max_tokens=10, temperature=0.0, stop=(stop, "qqqqqq")))
    job = Job(job.prompts, params, 1)
    plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)
    writer, _ = run(ck, plan, job, kv_budget_bytes=1 << 30)
    assert_matches_transformers(ck, job, writer)
    assert sum(c.finish_reason == "stop" for c in writer.completions.values()) >= len(job.prompts) // 2


def test_resume_skips_done_requests_and_their_unneeded_prefixes(checkpoints):
    ck = checkpoints("llama")
    job = make_job(ck, 0, with_eos=False)
    plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)
    # Skip every member of one top-level group: its shared segments must not be computed.
    layout = plan.layout
    top = int(np.flatnonzero(layout.node_parent == -1)[0])
    chain_top = []
    for r in range(len(job.prompts)):
        n = int(layout.request_node[r])
        while n >= 0 and layout.node_parent[n] >= 0:
            n = int(layout.node_parent[n])
        chain_top.append(n)
    skip = {f"r{r}" for r in range(len(job.prompts)) if chain_top[r] == top}
    assert skip
    writer, summary = run(ck, plan, job, kv_budget_bytes=1 << 30, skip_ids=skip)
    assert_matches_transformers(ck, job, writer, skip_ids=skip)
    prompt_len = plan.tokens.lengths
    ran = [r for r in range(len(job.prompts)) if f"r{r}" not in skip]
    assert summary.prompt_tokens == int(prompt_len[ran].sum())
    assert summary.computed_prompt_tokens < layout.prefill_tokens - int(layout.node_len[top]) + 1


def test_a_failure_becomes_an_error_line_and_the_run_goes_on(checkpoints):
    ck = checkpoints("llama")
    job = make_job(ck, 0, with_eos=False)
    plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)
    # Planned on a large budget, run on one that a long request cannot fit: it is rejected, the rest run.
    need = [len(p) + s.max_tokens for p, s in zip(job.prompts, job.params, strict=True)]
    budget = (sorted(need)[-1] - 1) * ck.model.config.kv_bytes_per_token
    big = [i for i, n in enumerate(need) if n * ck.model.config.kv_bytes_per_token > budget]

    class NanOnce:
        """The model, except that one row of the third step's logits is NaN."""

        def __init__(self, model):
            self.model, self.calls = model, 0

        def __getattr__(self, name):
            return getattr(self.model, name)

        def compute_logits(self, hidden):
            logits = self.model.compute_logits(hidden)
            self.calls += 1
            if self.calls == 3:
                logits[0] = torch.nan
            return logits

    writer = FakeWriter()
    summary = Engine(NanOnce(ck.model), ck.tokenizer, plan, kv_budget_bytes=budget, eos_token_ids=(1,)).run(writer)
    codes = sorted(code for code, _ in writer.errors.values())
    assert codes.count("kv_budget_exceeded") == len(big) and codes.count("nan_logits") == 1
    assert summary.num_failed == len(writer.errors) and summary.num_completed == len(writer.completions)
    assert len(writer.errors) + len(writer.completions) == len(job.prompts)
    for rid, got in writer.completions.items():
        i = int(rid[1:])
        assert got.token_ids == ck.expected(job.prompts[i], job.params[i], 1)[0]


def test_seeded_sampling_does_not_depend_on_the_batch(checkpoints):
    ck = checkpoints("llama")
    job, plan = seeded_job(ck, 3, first_seed=100, max_tokens=8, temperature=0.9, top_p=0.95)
    params = job.params
    batched, _ = run(ck, plan, job, kv_budget_bytes=1 << 30)
    for i in (0, 5, len(job.prompts) - 1):
        alone = Job([job.prompts[i]], [params[i]], 1)
        writer, _ = run(ck, build_plan(alone, kv_bytes_per_token=ck.model.config.kv_bytes_per_token), alone,
                        kv_budget_bytes=1 << 30, seed=123)
        assert writer.completions["r0"].token_ids == batched.completions[f"r{i}"].token_ids


def test_run_summary_and_metrics(checkpoints):
    ck = checkpoints("llama")
    job = make_job(ck, 0, with_eos=False)
    plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)
    metrics = FakeMetrics()
    writer, summary = run(ck, plan, job, kv_budget_bytes=1 << 30, metrics=metrics)
    assert isinstance(summary, RunSummary) and summary.num_steps == len(metrics.steps)
    assert metrics.summary == dict(
        wall_seconds=summary.wall_seconds, prompt_tokens=summary.prompt_tokens,
        computed_prompt_tokens=summary.computed_prompt_tokens, output_tokens=summary.output_tokens,
        peak_kv_bytes=summary.peak_kv_bytes, num_preemptions=0,
    )
    assert summary.prompt_tokens == plan.layout.prompt_tokens
    assert sum(s["num_prefill_tokens"] for s in metrics.steps) == summary.computed_prompt_tokens


def test_triton_backend_matches_transformers(tmp_path):
    """The CUDA path's wiring (TritonBackend: each step's layouts made once on the host, the kernels called per
    layer, states merged) gives transformers' tokens; on a machine without CUDA the kernels run in Triton's
    interpreter (tests/conftest.py), on a GPU they are compiled."""
    from batchrun.attention import TritonBackend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = make_checkpoint(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=64)  # the kernels take head sizes 64, 80, 96 and 128
    ck = Checkpoint(path)
    if device.type == "cuda":
        ck.model = load_model(ck.spec, device=device)
    job = make_job(ck, 0, with_eos=False)
    plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)
    assert plan.layout.num_levels >= 2
    writer, summary = run(ck, plan, job, kv_budget_bytes=1 << 30, backend=TritonBackend(device))
    assert_matches_transformers(ck, job, writer)
    assert summary.computed_prompt_tokens == plan.layout.prefill_tokens
