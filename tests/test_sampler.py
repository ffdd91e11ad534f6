"""Sampling: greedy, top-k/top-p cuts, per-request seeds independent of the batch, min_tokens, and the finish
rules (EOS, stop strings, max_tokens)."""

from __future__ import annotations

import numpy as np
import torch

from batchrun.engine.sampler import Sampler, StopChecker
from batchrun.model.spec import resolve_model
from batchrun.requests import SamplingParams
from batchrun.tokenizer import load_tokenizer

EOS = 1


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 16, **kw})


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [_params(temperature=0.0)] * 3 + [_params(temperature=0.8, top_k=1)] * 3
    sampler = Sampler(params, eos_token_ids=[EOS])
    tokens = sampler.sample(logits.clone(), np.arange(6), np.full(6, 5))
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
        solo = alone.sample(rows[step : step + 1].clone(), np.array([0]), np.array([step]))
        others = rng.choice(np.arange(1, len(params)), size=int(rng.integers(1, 30)), replace=False)
        batch = np.r_[others[: len(others) // 2], 0, others[len(others) // 2 :]]
        logits = torch.randn(len(batch), 200) * 3
        logits[len(others) // 2] = rows[step]
        tokens = batched.sample(logits, batch, np.full(len(batch), step))
        assert tokens[len(others) // 2] == solo[0]


def test_samples_follow_the_distribution_within_the_cuts():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    sampler = Sampler([_params(temperature=1.0, top_p=0.8)], eos_token_ids=[], seed=0)
    tokens = sampler.sample(logits.clone(), np.zeros(4000, np.int64), np.zeros(4000, np.int64))
    counts = np.bincount(tokens, minlength=4) / 4000
    # top_p 0.8 keeps {0, 1} (0.5 + 0.3 reaches 0.8), renormalised to 0.625 / 0.375.
    assert counts[2] == counts[3] == 0 and abs(counts[0] - 0.625) < 0.03
    sampler = Sampler([_params(temperature=1.0, top_k=3)], eos_token_ids=[], seed=0)
    tokens = sampler.sample(logits.clone(), np.zeros(4000, np.int64), np.zeros(4000, np.int64))
    counts = np.bincount(tokens, minlength=4) / 4000
    assert counts[3] == 0 and abs(counts[2] - 0.15 / 0.95) < 0.03


def test_min_tokens_suppresses_eos():
    logits = torch.zeros(2, 10)
    logits[:, EOS] = 10.0
    sampler = Sampler([_params(temperature=0.0, min_tokens=3)] * 2, eos_token_ids=[EOS])
    tokens = sampler.sample(logits, np.array([0, 1]), np.array([2, 3]))
    assert tokens[0] != EOS and tokens[1] == EOS


class _Decode:
    """Token i decodes to the i-th entry of `pieces`."""

    def __init__(self, pieces):
        self.pieces = pieces

    def __call__(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_stop_checker_rules():
    decode = _Decode(["a", "</s>", "b", "STO", "P", "c"])
    eos = frozenset({EOS})
    check = StopChecker(_params(max_tokens=3), eos_token_ids=eos)
    assert [check.check([0] * n, decode) for n in (1, 2, 3)] == [None, None, "length"]
    check = StopChecker(_params(max_tokens=5), eos_token_ids=eos)
    assert check.check([0, 1], decode) == "stop"  # EOS
    # A stop string split over two tokens; the text is cut before it.
    check = StopChecker(_params(max_tokens=9, stop=("STOP", "zz")), eos_token_ids=eos)
    ids = [0, 2, 3]
    assert check.check(ids, decode) is None
    ids.append(4)
    assert check.check(ids, decode) == "stop" and check.final_text(decode(ids)) == "ab"
    # Stop at the last allowed token is "stop", not "length".
    check = StopChecker(_params(max_tokens=2, stop=("b",)), eos_token_ids=eos)
    assert check.check([0], decode) is None and check.check([0, 2], decode) == "stop"
    # Before min_tokens neither EOS nor a stop string ends it, and a stop string completed before is ignored.
    check = StopChecker(_params(max_tokens=9, min_tokens=3, stop=("b",)), eos_token_ids=eos)
    assert check.check([2], decode) is None and check.check([2, 1], decode) is None
    assert check.check([2, 1, 0], decode) is None and check.check([2, 1, 0, 2], decode) == "stop"
    assert check.final_text(decode([2, 1, 0, 2])) == "b</s>a"


def test_stop_checker_text_is_the_full_decode_and_costs_linear_decoding():
    """The incremental text equals decoding the whole output (multi-byte characters split over byte-level
    tokens included), a stop string is found as in the whole text, and decoding stays linear in the output."""
    tokenizer = load_tokenizer(resolve_model("builtin-tiny"))
    text = "naïve café 日本語の文章 — “quotes” and emoji 🙂🙂 then: STOP here, and more text after it"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded_tokens = []

    def decode(window: list[int]) -> str:
        decoded_tokens.append(len(window))
        return tokenizer.decode(window, skip_special_tokens=True)

    checker = StopChecker(_params(max_tokens=len(ids) + 1, stop=("STOP",)), eos_token_ids=frozenset([EOS]))
    reasons = []
    while not reasons or reasons[-1] is None:
        reasons.append(checker.check(ids[: len(reasons) + 1], decode))
    stop_step = len(reasons) - 1
    assert reasons[-1] == "stop"
    full = tokenizer.decode(ids[: stop_step + 1], skip_special_tokens=True)
    assert checker.text == full and checker.final_text(full) == text[: text.index("STOP")]
    assert sum(decoded_tokens) <= 8 * (stop_step + 1)  # a full decode per step would be quadratic

    rng = np.random.default_rng(0)
    alphabet = list("abc xyz,.\n") + list("éüñ日本語文🙂—“”")
    for _ in range(20):  # random text: many characters split over byte-level tokens
        sample = "".join(rng.choice(alphabet, 80))
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        checker = StopChecker(_params(max_tokens=1000, stop=("#",)), eos_token_ids=frozenset([EOS]))
        for i in range(len(ids)):
            checker.check(ids[: i + 1], decode)
        assert checker.text == sample
