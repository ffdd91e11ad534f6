"""The finish rules (EOS, stop strings, max_tokens): one request's StopChecker, with its incremental text."""

from __future__ import annotations

import numpy as np

from batchrun.engine.finish import StopChecker
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
