"""The logits processors and logprobs against independent references: transformers' logits processors
(repetition penalty, logit bias, temperature + min_p), OpenAI's documented formula for the frequency and
presence penalties, and float64 log_softmax for logprobs. fp32 throughout; tolerance 1e-5 (absolute and
relative) on the logits that stay finite, and exactly the same set of masked tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from batchrun.engine.logits_processors import LogitsProcessors
from batchrun.engine.logprobs import LogprobsRecorder
from batchrun.requests import SamplingParams
from batchrun.tokens import TokenTable

V = 50
TOL = {"atol": 1e-5, "rtol": 1e-5}


def random_params(rng: np.random.Generator) -> SamplingParams:
    bias = {int(t): float(rng.uniform(-100, 100)) for t in rng.choice(V, rng.integers(0, 4), replace=False)}
    return SamplingParams(
        max_tokens=8,
        temperature=float(rng.choice([0.0, 0.5, 1.3])),
        min_p=float(rng.choice([0.0, 0.05, 0.3])),
        presence_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
        frequency_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
        repetition_penalty=float(rng.choice([1.0, rng.uniform(0.5, 2.0)])),
        logit_bias=tuple(sorted(bias.items())),
    )


def reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One row [1, V] through transformers' processors, in vLLM's order."""
    x = logits.clone()
    if p.logit_bias:
        x = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias})(torch.tensor([[0]]), x)
    if p.repetition_penalty != 1.0:
        ids = torch.tensor([prompt + output])
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    counts = torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=V).float()
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()  # OpenAI's formula
    if p.min_p and p.temperature:
        warped = MinPLogitsWarper(p.min_p)(None, TemperatureLogitsWarper(p.temperature)(None, x.clone()))
        x = x.masked_fill(torch.isinf(warped), -torch.inf)
    return x


@pytest.mark.parametrize("seed", range(6))
def test_processors_match_transformers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_requests = 12
    params = [random_params(rng) for _ in range(num_requests)]
    prompts = [rng.integers(0, V, rng.integers(1, 9)).tolist() for _ in range(num_requests)]
    outputs = [rng.integers(0, V, rng.integers(0, 12)).tolist() for _ in range(num_requests)]
    lengths = [len(p) for p in prompts]
    table = TokenTable(np.concatenate(prompts).astype(np.int32), np.concatenate([[0], np.cumsum(lengths)]))
    processors = LogitsProcessors(params, prompts=table, device=torch.device("cpu"))
    requests = rng.permutation(num_requests)[:9].astype(np.int64)  # a step's rows, in any order
    logits = torch.randn(len(requests), V, generator=torch.Generator().manual_seed(seed)) * 3
    expected = torch.cat([reference(logits[i : i + 1], params[r], prompts[r], outputs[r])
                          for i, r in enumerate(requests.tolist())])
    processors.apply(logits, requests, output_ids=outputs)
    assert torch.equal(torch.isinf(logits), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(logits[finite], expected[finite], **TOL)


def test_inactive_requests_are_left_alone() -> None:
    params = [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, temperature=0.0, min_p=0.5)]
    table = TokenTable(np.array([1, 2], np.int32), np.array([0, 1, 2]))
    logits = torch.randn(2, V)
    before = logits.clone()
    LogitsProcessors(params, prompts=table, device=torch.device("cpu")).apply(
        logits, np.array([0, 1]), output_ids=[[3], [4]])
    assert torch.equal(logits, before)  # min_p does nothing to a greedy request


def test_logprobs_against_float64_log_softmax() -> None:
    params = [SamplingParams(max_tokens=4, logprobs=True, top_logprobs=3), SamplingParams(max_tokens=4),
              SamplingParams(max_tokens=4, logprobs=True)]
    recorder = LogprobsRecorder(params, token_bytes=lambda t: f"<{t}>".encode() if t != 6 else b"\xe2\x80")
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 4
    requests, tokens = np.array([2, 1, 0]), np.array([5, 6, 7])
    captured = recorder.capture(logits, requests)
    logits.fill_(0.0)  # the processors and the sampler change the logits afterwards: the capture is a copy
    recorder.record(captured, requests, tokens)
    assert recorder.take(1) is None
    ref = torch.log_softmax(torch.randn(3, V, generator=torch.Generator().manual_seed(0)).double() * 4, dim=-1)
    (a,) = recorder.take(0)  # row 2 of the step
    assert (a.token, a.bytes) == ("<7>", list(b"<7>")) and a.logprob == pytest.approx(float(ref[2, 7]), abs=1e-5)
    top = ref[2].topk(3)
    assert [t.token for t in a.top] == [f"<{i}>" if i != 6 else "bytes:\\xe2\\x80" for i in top.indices.tolist()]
    assert [t.logprob for t in a.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    (c,) = recorder.take(2)
    assert c.token == "<5>" and c.top == [] and c.logprob == pytest.approx(float(ref[0, 5]), abs=1e-5)
    recorder.record(recorder.capture(torch.zeros(1, V), np.array([0])), np.array([0]), np.array([6]))
    (d,) = recorder.take(0)
    assert (d.token, d.bytes) == ("bytes:\\xe2\\x80", [0xE2, 0x80])  # part of a character: shown as bytes
