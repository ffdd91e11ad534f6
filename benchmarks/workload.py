#!/usr/bin/env python3
"""Prefix-sharing JSONL workloads for the BatchLLM microbenchmarks, made from real text (Python's sources).

Knobs: shared system prompt → document (prefix) → question (suffix) levels, share degree (questions per
document), output length, file order, plain or OpenAI batch lines. Standard library only (vLLM's Python runs it).

  workload.py --docs 8 --per-doc 16 --prefix 400 --suffix 40 --out 32 --order interleaved -o w.jsonl
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

# grouped: a document's questions together; interleaved: round robin over documents; shuffled: at random
Order = Literal["grouped", "interleaved", "shuffled"]
ORDERS: tuple[str, ...] = get_args(Order)
_MAX_SOURCE_FILES = 200  # plenty of text; reading every module would only slow start-up


@dataclass(frozen=True)
class WorkloadConfig:
    """Lengths are in words of source text; the built-in tokenizer makes about 2-3 tokens of each."""

    docs: int = 4  # groups sharing a document
    per_doc: int = 8  # share degree: requests per document
    system: int = 0  # words of a system prompt shared by every request (0: none): the top sharing level
    prefix: int = 200  # words of each document
    suffix: int = 20  # words of each request's own question
    out: int = 16  # output tokens per request
    out_max: int | None = None  # draw each request's output length in [out, out_max]
    is_fixed_out: bool = True  # min_tokens = max_tokens, so every system generates the same count
    order: Order = "interleaved"
    format: str = "plain"  # "plain" or "openai"
    is_chat: bool = False  # messages (system + user) instead of a completion prompt
    model: str = "default"  # OpenAI body.model
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.docs >= 1 and self.per_doc >= 1 and self.out >= 1, self
        assert self.out_max is None or self.out_max >= self.out, self
        assert self.order in ORDERS and self.format in ("plain", "openai"), self

    @property
    def num_requests(self) -> int:
        return self.docs * self.per_doc


def source_words() -> list[str]:
    """Words of this Python's standard-library sources, in a fixed order (the same on every run)."""
    root = os.path.dirname(os.__file__)
    words: list[str] = []
    for path in sorted(glob.glob(os.path.join(root, "*.py")))[:_MAX_SOURCE_FILES]:
        if os.path.basename(path).startswith("_sysconfig"):
            continue  # this machine's build settings, not text
        with open(path, encoding="utf-8", errors="ignore") as f:
            # No file-system paths: they say where things lie on some machine, which no workload needs.
            words += [w for w in f.read().split() if "/" not in w]
    return words


def make_workload(config: WorkloadConfig, words: list[str] | None = None) -> list[dict[str, Any]]:
    """The input lines, in file order."""
    words = words if words is not None else source_words()
    rng = random.Random(config.seed)

    def span(n: int) -> str:
        i = rng.randrange(0, len(words) - n)
        return " ".join(words[i:i + n])

    system = f"You answer questions about code. {span(config.system)}" if config.system else ""
    by_doc: list[list[dict[str, Any]]] = []
    for d in range(config.docs):
        document = f"Document {d}:\n{span(config.prefix)}"
        rows = []
        for q in range(config.per_doc):
            out = rng.randint(config.out, config.out_max) if config.out_max else config.out
            question = f"Question {q}: {span(config.suffix)}\nAnswer:"
            rows.append(_line(config, f"d{d}-q{q}", system, f"{document}\n{question}", out))
        by_doc.append(rows)
    return _ordered(by_doc, config.order, rng)


def _ordered(by_doc: list[list[dict[str, Any]]], order: Order, rng: random.Random) -> list[dict[str, Any]]:
    if order == "grouped":
        return [row for rows in by_doc for row in rows]
    if order == "interleaved":  # round robin: the worst case for a cache that sees requests in file order
        longest = max(len(rows) for rows in by_doc)
        return [rows[i] for i in range(longest) for rows in by_doc if i < len(rows)]
    flat = [row for rows in by_doc for row in rows]
    rng.shuffle(flat)
    return flat


def _line(config: WorkloadConfig, rid: str, system: str, user: str, out: int) -> dict[str, Any]:
    sampling: dict[str, Any] = {"max_tokens": out, "temperature": 0}
    if config.is_fixed_out:
        sampling["min_tokens"] = out
    if config.is_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        content: dict[str, Any] = {"messages": messages}
    else:
        content = {"prompt": f"{system}\n{user}" if system else user}
    if config.format == "openai":
        url = "/v1/chat/completions" if config.is_chat else "/v1/completions"
        return {"custom_id": rid, "method": "POST", "url": url,
                "body": {"model": config.model, **content, **sampling}}
    return {"id": rid, **content, **sampling}


def write_workload(rows: list[dict[str, Any]], path: str | os.PathLike[str] | None) -> None:
    f = sys.stdout if path is None else open(path, "w", encoding="utf-8")
    try:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if path is not None:
            f.close()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The workload options, shared with e2e_bench.py."""
    d = WorkloadConfig()
    ap.add_argument("--docs", type=int, default=d.docs, help="documents (top-level groups)")
    ap.add_argument("--per-doc", type=int, default=d.per_doc, help="share degree: questions per document")
    ap.add_argument("--system", type=int, default=d.system, help="words of a system prompt shared by all")
    ap.add_argument("--prefix", type=int, default=d.prefix, help="words of each document")
    ap.add_argument("--suffix", type=int, default=d.suffix, help="words of each question")
    ap.add_argument("--out", type=int, default=d.out, help="output tokens per request")
    ap.add_argument("--out-max", type=int, default=None, help="output lengths drawn in [--out, --out-max]")
    ap.add_argument("--order", choices=ORDERS, default=d.order)
    ap.add_argument("--seed", type=int, default=d.seed)


def config_from_args(a: argparse.Namespace, **overrides: Any) -> WorkloadConfig:
    fields = {k: getattr(a, k) for k in ("docs", "per_doc", "system", "prefix", "suffix", "out", "out_max",
                                         "order", "seed")}
    return WorkloadConfig(**{**fields, **overrides})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--format", choices=("plain", "openai"), default="plain")
    ap.add_argument("--chat", action="store_true", help="chat messages instead of a completion prompt")
    ap.add_argument("--free-out", action="store_true", help="let EOS end a request (no min_tokens)")
    ap.add_argument("--model", default="default", help="OpenAI body.model")
    ap.add_argument("-o", "--output", type=Path, default=None, help="file to write [default: stdout]")
    a = ap.parse_args()
    config = config_from_args(a, format=a.format, is_chat=a.chat, is_fixed_out=not a.free_out, model=a.model)
    write_workload(make_workload(config), a.output)
    print(f"workload: {config.num_requests} requests, {json.dumps(asdict(config))}", file=sys.stderr)


if __name__ == "__main__":
    main()
