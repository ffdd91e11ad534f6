"""Sampling: greedy, top-k/top-p cuts, per-request seeds independent of the batch, min_tokens (the finish rules
are tested in test_finish.py)."""

from __future__ import annotations

import numpy as np
import torch

from batchrun.engine.sampler import Sampler
from batchrun.requests import SamplingParams

EOS = 1


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 16, **kw})


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [_params(temperature=0.0)] * 3 + [_params(temperature=0.8, top_k=1)] * 3
    sampler = Sampler(params, eos_token_ids=[EOS])
    tokens = sampler.sample(logits.clone(), np.arange(6), np.full(6, 5)).numpy()
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_batch():
    torch.manual_seed(1)
    rows = torch.randn(8, 200) * 3
    params = [_params(temperature=1.0, seed=1234, top_p=0.9)]
    params += [_params(temperature=0.7, seed=i if i % 2 else None, top_k=20) for i in range(40)]
    params += [_params(temperature=0.0)] * 10
    alone = Sampler(params, eos_token_ids=[EOS], seed=0)
    batched = Sampler(params, eos_token_ids=[EOS], seed=99)
    rng = np.random.default_rng(0)
    for step in range(8):
        solo = alone.sample(rows[step : step + 1].clone(), np.array([0]), np.array([step])).numpy()
        others = rng.choice(np.arange(1, len(params)), size=int(rng.integers(1, 30)), replace=False)
        batch = np.r_[others[: len(others) // 2], 0, others[len(others) // 2 :]]
        logits = torch.randn(len(batch), 200) * 3
        logits[len(others) // 2] = rows[step]
        tokens = batched.sample(logits, batch, np.full(len(batch), step)).numpy()
        assert tokens[len(others) // 2] == solo[0]


def test_samples_follow_the_distribution_within_the_cuts():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    sampler = Sampler([_params(temperature=1.0, top_p=0.8)], eos_token_ids=[], seed=0)
    tokens = sampler.sample(logits.clone(), np.zeros(4000, np.int64), np.zeros(4000, np.int64)).numpy()
    counts = np.bincount(tokens, minlength=4) / 4000
    # top_p 0.8 keeps {0, 1} (0.5 + 0.3 reaches 0.8), renormalised to 0.625 / 0.375.
    assert counts[2] == counts[3] == 0 and abs(counts[0] - 0.625) < 0.03
    sampler = Sampler([_params(temperature=1.0, top_k=3)], eos_token_ids=[], seed=0)
    tokens = sampler.sample(logits.clone(), np.zeros(4000, np.int64), np.zeros(4000, np.int64)).numpy()
    counts = np.bincount(tokens, minlength=4) / 4000
    assert counts[3] == 0 and abs(counts[2] - 0.15 / 0.95) < 0.03


def test_min_tokens_suppresses_eos():
    logits = torch.zeros(2, 10)
    logits[:, EOS] = 10.0
    sampler = Sampler([_params(temperature=0.0, min_tokens=3)] * 2, eos_token_ids=[EOS])
    tokens = sampler.sample(logits, np.array([0, 1]), np.array([2, 3])).numpy()
    assert tokens[0] != EOS and tokens[1] == EOS


def test_64_bit_seeds_draw_their_own_streams_on_the_cpu():
    logits = torch.zeros(1, 1000)  # uniform: the draw is the noise alone
    seeds = [1, 2**32 + 1, -1, 2**32 - 1, 2**63 - 1, -(2**63)]

    def draws(seed: int) -> list[int]:
        sampler = Sampler([_params(temperature=1.0, seed=seed)], eos_token_ids=[EOS])
        return [int(sampler.sample(logits.clone(), np.array([0]), np.array([i]))[0]) for i in range(8)]

    streams = [draws(s) for s in seeds]
    assert len({tuple(d) for d in streams}) == len(seeds)
    assert draws(2**32 + 1) == streams[1]  # still reproducible
