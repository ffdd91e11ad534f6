"""Sampling options through the whole engine against transformers' `generate` on one random-weight checkpoint
(greedy, fp32): the repetition penalty, logit_bias and logprobs (the raw distribution, tolerance 1e-4); and
n samples of one request: the prompt prefilled once, each sample equal to a single request run alone with
its seed stream (seed + index).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from batchrun.engine.engine import Engine
from batchrun.planner import PlannerConfig, plan_requests
from batchrun.planning import samples
from batchrun.requests import Request, SamplingParams
from batchrun.tokenizer import token_bytes_of
from batchrun.tokens import TokenTable
from checkpoints import make_checkpoint
from test_engine import VOCAB, Checkpoint, Job, Plan, build_plan, run


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Checkpoint:
    return Checkpoint(make_checkpoint(tmp_path_factory.mktemp("llama"), "llama"))


@dataclass
class SampleWriter:
    """Completions by (id, sample index)."""

    completions: dict = field(default_factory=dict)

    def write_completion(self, request, completion):
        key = (request.id, request.sample_index)
        assert key not in self.completions
        self.completions[key] = completion
        return True

    def write_error(self, record, *, code=None, message=None):
        raise AssertionError(f"{record.id}: {code} {message}")


def prompts(rng: np.random.Generator, num: int) -> list[list[int]]:
    system = [0] + rng.integers(2, VOCAB, 12).tolist()
    return [system + rng.integers(2, VOCAB, int(rng.integers(2, 8))).tolist() for _ in range(num)]


def hf_generate(ck, prompt: list[int], max_new_tokens: int, **kw):
    ids = torch.tensor([prompt])
    return ck.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=VOCAB - 1, return_dict_in_generate=True, output_logits=True, **kw)


def test_penalties_bias_and_logprobs_match_transformers(ck):
    rng = np.random.default_rng(0)
    token_bytes = token_bytes_of(ck.tokenizer)
    job_prompts = prompts(rng, 4)
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.7, logprobs=True, top_logprobs=3),
        SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=0.6),
        SamplingParams(max_tokens=6, temperature=0.0, logit_bias=((5, 100.0),)),  # forces token 5
        SamplingParams(max_tokens=8, temperature=0.0, logprobs=True),
    ]
    job = Job(job_prompts, params, eos=1)
    writer, _ = run(ck, build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token), job,
                    kv_budget_bytes=1 << 30)
    for i, p in enumerate(params):
        kw = {}
        if p.repetition_penalty != 1.0:
            kw["repetition_penalty"] = p.repetition_penalty
        if p.logit_bias:
            kw["sequence_bias"] = {(t,): b for t, b in p.logit_bias}
        ref = hf_generate(ck, job_prompts[i], p.max_tokens, **kw)
        got = writer.completions[f"r{i}"]
        assert got.token_ids == ref.sequences[0, len(job_prompts[i]):].tolist(), i
        if not p.logprobs:
            assert got.logprobs is None
            continue
        raw = torch.log_softmax(torch.cat(ref.logits).double(), dim=-1)  # [steps, V]: generate's raw logits
        assert [lp.logprob for lp in got.logprobs] == pytest.approx(
            raw.gather(1, torch.tensor(got.token_ids).unsqueeze(1)).squeeze(1).tolist(), abs=1e-4)
        for step, lp in enumerate(got.logprobs):
            top = raw[step].topk(p.top_logprobs)
            assert [t.logprob for t in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert [t.bytes for t in lp.top] == [list(token_bytes(t)) for t in top.indices.tolist()]
        text = bytes(b for lp in got.logprobs for b in lp.bytes).decode(errors="replace")
        assert text == ck.tokenizer.decode(got.token_ids)  # the bytes rebuild the output
    assert writer.completions["r2"].token_ids == [5] * 6


def test_n_samples_share_the_prompt_and_equal_single_requests(ck):
    rng = np.random.default_rng(1)
    prompt = prompts(rng, 1)[0]
    n = 5
    base = Request(line=1, id="q", format="plain", endpoint="completions", num_samples=n,
                   sampling=SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=40))
    rows = samples(base)
    assert [r.sampling.seed for r in rows] == [40 + i for i in range(n)]
    tokens = TokenTable.from_lists([prompt] * n)
    config = PlannerConfig(kv_budget_bytes=1 << 30, min_prefix_len=4, max_levels=3, share=True)
    kv = ck.model.config.kv_bytes_per_token
    layout = plan_requests(tokens, np.full(n, 8), kv_bytes_per_token=kv, config=config)
    assert layout.prefill_tokens == len(prompt) - 1 + n  # the prompt once, each sample's last token its own
    writer = SampleWriter()
    summary = Engine(ck.model, ck.tokenizer, Plan(rows, tokens, layout), kv_budget_bytes=1 << 30,
                     eos_token_ids=(1,)).run(writer)
    assert summary.computed_prompt_tokens == len(prompt) - 1 + n
    outputs = [writer.completions["q", i].token_ids for i in range(n)]
    assert len({tuple(o) for o in outputs}) > 1  # distinct seed streams
    for i in range(n):
        alone = dataclasses.replace(base, num_samples=1, sampling=rows[i].sampling)
        single = Job([prompt], [alone.sampling], eos=1)
        w, _ = run(ck, build_plan(single, kv_bytes_per_token=kv), single, kv_budget_bytes=1 << 30, seed=7)
        assert w.completions["r0"].token_ids == outputs[i], i


def test_sampling_options_on_the_triton_backend(tmp_path):
    """The same options through TritonBackend (compiled on a GPU, else Triton's interpreter) give the torch
    backend's tokens and logprobs (1e-4): the processors run on whatever device the logits are on."""
    from batchrun.attention import TorchBackend, TritonBackend
    from batchrun.model.loader import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ck = Checkpoint(make_checkpoint(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=64))  # the kernels take head sizes 64, 80, 96 and 128
    job_prompts = prompts(np.random.default_rng(2), 3)
    params = [SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5,
                             logprobs=True, top_logprobs=2),
              SamplingParams(max_tokens=6, temperature=0.0, frequency_penalty=1.0, logit_bias=((7, 5.0),)),
              SamplingParams(max_tokens=6, temperature=0.0, logit_bias=((3, -100.0),), logprobs=True)]
    job = Job(job_prompts, params, eos=1)
    plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)
    reference, _ = run(ck, plan, job, kv_budget_bytes=1 << 30, backend=TorchBackend(torch.device("cpu")))
    if device.type == "cuda":
        ck.model = load_model(ck.spec, device=device)
    got, _ = run(ck, plan, job, kv_budget_bytes=1 << 30, backend=TritonBackend(device))
    for rid, want in reference.completions.items():
        assert got.completions[rid].token_ids == want.token_ids, rid
        if want.logprobs is not None:
            assert [p.logprob for p in got.completions[rid].logprobs] == pytest.approx(
                [p.logprob for p in want.logprobs], abs=1e-4)
