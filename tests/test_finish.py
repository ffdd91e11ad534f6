"""The finish rules (EOS, stop strings, max_tokens, NaN logits) over a step, one request's StopChecker with its
incremental text, and the per-request state's slot bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from batchrun.engine.finish import Finished, FinishRules, StopChecker
from batchrun.engine.request_state import RequestState
from batchrun.model.spec import resolve_model
from batchrun.requests import SamplingParams
from batchrun.tokenizer import load_tokenizer

EOS = 1


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 16, **kw})


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


def test_stop_strings_follow_vllm_min_tokens_and_order():
    """vLLM's rules: a stop string completed by token min_tokens does not count (the first that does is token
    min_tokens + 1's), a short stop string that ended in older text is not found because a longer one is
    listed, and of two in the same new text the one that completes first wins."""
    decode = _Decode(["a", "</s>", "b", "STO", "P", "c", "xb"])
    eos = frozenset({EOS})
    check = StopChecker(_params(max_tokens=9, min_tokens=2, stop=("b",)), eos_token_ids=eos)
    assert check.check([0], decode) is None and check.check([0, 2], decode) is None
    assert check.check([0, 2, 2], decode) == "stop" and check.final_text(decode([0, 2, 2])) == "ab"
    check = StopChecker(_params(max_tokens=9, min_tokens=1, stop=("b", "STOP")), eos_token_ids=eos)
    assert check.check([2], decode) is None and check.check([2, 0], decode) is None
    check = StopChecker(_params(max_tokens=9, stop=("xbSTOP", "STO")), eos_token_ids=eos)
    assert check.check([6], decode) is None and check.check([6, 3], decode) == "stop"
    assert check.final_text(decode([6, 3])) == "xb"


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


def test_finish_rules_fail_nan_rows_first_then_stop_strings_then_eos_and_length():
    decode = _Decode(["a", "</s>", "b", "STO", "P", "c"])
    params = [
        _params(max_tokens=9),  # EOS
        _params(max_tokens=9, min_tokens=4),  # EOS before min_tokens: goes on
        _params(max_tokens=2),  # length
        _params(max_tokens=9, stop=("STOP",)),  # a stop string
        _params(max_tokens=9),  # NaN logits
        _params(max_tokens=9),  # goes on
    ]
    rules = FinishRules(params, eos_token_ids=[EOS], decode=decode)
    output_ids = [[1], [1], [0, 0], [3, 4], [0], [0]]
    requests = np.arange(6)
    tokens = np.array([ids[-1] for ids in output_ids])
    num_generated = np.array([len(ids) for ids in output_ids])
    is_nan = np.array([False, False, False, False, True, False])
    got = rules.check(requests, tokens, num_generated=num_generated, output_ids=output_ids, is_nan=is_nan)
    assert got.nan_requests == [4]
    assert got.finished == [Finished(3, "stop"), Finished(0, "stop"), Finished(2, "length")]
    assert rules.text(3, output_ids[3]) == "" and rules.text(2, output_ids[2]) == "aa"


def test_request_state_holds_and_releases_slots_once():
    state = RequestState(num_requests=2, num_nodes=1)
    state.hold_node(0, np.array([0, 1]))
    state.hold_request(1, np.array([2, 3, 4]))
    state.append(np.array([1]), np.array([7]))
    assert state.is_admitted(1) and not state.is_admitted(0)
    assert state.output_ids[1] == [7] and state.last_token[1] == 7 and state.num_generated[1] == 1
    assert state.release_request(1).tolist() == [2, 3, 4] and state.output_ids[1] == []
    assert state.release_node(0).tolist() == [0, 1]
    with pytest.raises(AssertionError):
        state.release_node(0)
