"""Planning throughput (radix tree + prefix selection + order + batches) against tokenization throughput.

Synthetic BatchLLM-style workload, shuffled into file order: 20 system prompts of ~300 tokens, documents of
~500 tokens each asked 5-20 unique ~100-token questions. Token ids for planning are drawn with numpy; the
tokenizer is timed on text built the same way from a sample. Planning must stay far faster than
tokenization, which it follows in `batchrun plan`. Compare the ratio, not absolute times (shared machine).

    .venv/bin/python benchmarks/plan_bench.py [--requests 100000] [--tokenize-sample 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from batchrun import defaults
from batchrun.plan import Plan, PlanHeader, PlanSummary
from batchrun.planfile import load_plan, save_plan
from batchrun.planner import PlanLayout, PlannerConfig, plan_requests, request_kv_bytes
from batchrun.requests import Request, SamplingParams
from batchrun.sizes import parse_size
from batchrun.tokens import TokenTable
from batchrun.trie import build_radix_tree

BUILTIN_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "src", "batchrun", "model", "builtin")
NUM_SYSTEMS = 20
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # Llama-3.1-8B in bf16: K and V, 32 layers, 8 KV heads of 128
FILL_CHUNK = 10_000  # requests filled per numpy step (bounds the index arrays' memory)


class Workload:
    """Per-request structure: which system prompt and document, and the question length."""

    def __init__(self, num_requests: int, rng: np.random.Generator) -> None:
        self.system_len = rng.integers(250, 351, NUM_SYSTEMS)
        per_doc = rng.integers(5, 21, num_requests // 5 + 1)
        num_docs = int(np.searchsorted(np.cumsum(per_doc), num_requests)) + 1
        self.doc_len = rng.integers(400, 601, num_docs)
        self.doc_system = rng.integers(0, NUM_SYSTEMS, num_docs)
        self.request_doc = rng.permutation(np.repeat(np.arange(num_docs), per_doc[:num_docs])[:num_requests])
        self.question_len = rng.integers(50, 151, num_requests)
        self.max_tokens = rng.integers(16, 513, num_requests).astype(np.int32)

    @property
    def prompt_len(self) -> np.ndarray:
        doc = self.request_doc
        return self.system_len[self.doc_system[doc]] + self.doc_len[doc] + self.question_len


def ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + lens[i]) without a Python loop."""
    offsets = np.concatenate(([0], np.cumsum(lens)[:-1]))
    return np.repeat(starts - offsets, lens) + np.arange(int(lens.sum()))


def synthetic_tokens(work: Workload, rng: np.random.Generator, vocab: int) -> TokenTable:
    sys_start = np.concatenate(([0], np.cumsum(work.system_len)))
    doc_start = sys_start[-1] + np.concatenate(([0], np.cumsum(work.doc_len)))
    pool = rng.integers(0, vocab, int(doc_start[-1]), dtype=np.int32)  # system prompts, then documents
    indptr = np.concatenate(([0], np.cumsum(work.prompt_len))).astype(np.int64)
    tokens = np.empty(int(indptr[-1]), dtype=np.int32)
    for c0 in range(0, len(work.request_doc), FILL_CHUNK):
        doc = work.request_doc[c0 : c0 + FILL_CHUNK]
        system = work.doc_system[doc]
        s_len, d_len, q_len = work.system_len[system], work.doc_len[doc], work.question_len[c0 : c0 + FILL_CHUNK]
        out = indptr[c0 : c0 + len(doc)]
        tokens[ranges(out, s_len)] = pool[ranges(sys_start[system], s_len)]
        tokens[ranges(out + s_len, d_len)] = pool[ranges(doc_start[doc], d_len)]
        tokens[ranges(out + s_len + d_len, q_len)] = rng.integers(0, vocab, int(q_len.sum()), dtype=np.int32)
    return TokenTable(tokens=tokens, indptr=indptr)


def synthetic_texts(work: Workload, rng: np.random.Generator, words: list[str], num_texts: int) -> list[str]:
    """The same structure as text, for the first num_texts requests (~0.75 word per token)."""
    text = lambda n: " ".join(rng.choice(words, max(1, int(n * 0.75))))
    systems = [text(n) for n in work.system_len]
    docs: dict[int, str] = {}
    out = []
    for i in range(num_texts):
        d = int(work.request_doc[i])
        if d not in docs:
            docs[d] = text(work.doc_len[d])
        out.append(f"{systems[work.doc_system[d]]}\n\n{docs[d]}\n\nQuestion: {text(work.question_len[i])}")
    return out


class PeakRss:
    """Samples this process's resident memory in a thread (tracemalloc would slow the Python loops down)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak, self._stop = interval_s, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def encode(texts: list[str]) -> TokenTable:
    """The project's encoder when it offers encode_texts, else the fast tokenizer's batch call + TokenTable."""
    from transformers import AutoTokenizer

    from batchrun import tokenizer as project_tokenizer

    tok = AutoTokenizer.from_pretrained(BUILTIN_TOKENIZER, local_files_only=True)
    if hasattr(project_tokenizer, "encode_texts"):
        return project_tokenizer.encode_texts(tok, texts)
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    return TokenTable.from_lists(ids)


def tokenization_rate(work: Workload, rng: np.random.Generator, num_texts: int) -> tuple[float, int]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(BUILTIN_TOKENIZER, local_files_only=True).get_vocab()
    words = sorted(w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isalpha() and w[1:].islower())
    texts = synthetic_texts(work, rng, words, num_texts)
    encode(texts[:8])  # loads and warms the tokenizer outside the clock
    table, seconds = timed(lambda: encode(texts))
    return len(table.tokens) / seconds, len(table.tokens)


def plan_file_round_trip(table: TokenTable, layout: PlanLayout, max_tokens: np.ndarray,
                         config: PlannerConfig) -> None:
    """Saves and loads the plan file (the records of every request, the tokens, the layout): how long a
    `batchrun run` waits for its plan."""
    requests = [Request(line=i + 1, id=f"r{i}", format="plain", endpoint="completions",
                        sampling=SamplingParams(max_tokens=int(m))) for i, m in enumerate(max_tokens)]
    header = PlanHeader(input_path="bench", input_fingerprint="0", model_name="bench", model_path="bench",
                        model_dtype="bfloat16", model_fingerprint="0", kv_bytes_per_token=KV_BYTES_PER_TOKEN,
                        params=config, summary=PlanSummary.of(layout, num_requests=len(requests), num_invalid=0),
                        created="", batchrun_version="")
    plan = Plan(header=header, requests=requests, invalid=[], tokens=table, layout=layout)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.plan"
        _, save_s = timed(lambda: save_plan(plan, path))
        loaded, load_s = timed(lambda: load_plan(path))
        assert len(loaded.requests) == len(requests)
        size = path.stat().st_size
    print(f"plan file:  {size / 2**30:.2f} GiB, saved in {save_s:.1f} s, loaded in {load_s:.1f} s "
          f"(arrays memory-mapped)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--tokenize-sample", type=int, default=1000, help="requests whose text is tokenized")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--kv-budget", default=defaults.KV_BUDGET)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    work = Workload(args.requests, rng)
    table, gen_s = timed(lambda: synthetic_tokens(work, rng, args.vocab))
    num_tokens = len(table.tokens)
    print(f"workload: {args.requests:,} requests, {num_tokens:,} prompt tokens ({num_tokens / 2**30 * 4:.2f} GiB "
          f"int32), {len(work.doc_len):,} documents, made in {gen_s:.1f} s")

    config = PlannerConfig(kv_budget_bytes=parse_size(args.kv_budget), min_prefix_len=defaults.MIN_PREFIX_LEN,
                           max_levels=defaults.MAX_LEVELS, share=True)
    fits = request_kv_bytes(table.lengths, work.max_tokens, kv_bytes_per_token=KV_BYTES_PER_TOKEN)
    assert bool(np.all(fits <= config.kv_budget_bytes))
    base_rss = rss_bytes()
    with PeakRss() as tree_mem:
        tree, tree_s = timed(lambda: build_radix_tree(table, table.lengths - 1))
    num_nodes = tree.num_nodes
    del tree
    with PeakRss() as plan_mem:
        layout, plan_s = timed(lambda: plan_requests(table, work.max_tokens, kv_bytes_per_token=KV_BYTES_PER_TOKEN,
                                                     config=config))
    print(f"tree alone: {tree_s:.2f} s, {num_nodes:,} nodes, peak +{(tree_mem.peak - base_rss) / 2**20:,.0f} MiB")
    print(f"tree+plan:  {plan_s:.2f} s = {args.requests / plan_s:,.0f} requests/s = {num_tokens / plan_s / 1e6:,.1f}M "
          f"tokens/s; peak RSS {plan_mem.peak / 2**30:.2f} GiB (+{(plan_mem.peak - base_rss) / 2**20:,.0f} MiB over "
          f"the token table and workload)")
    print(f"plan: {layout.num_groups:,} groups, {layout.num_shared_nodes:,} shared nodes, {layout.num_levels} levels, "
          f"{layout.num_batches:,} batches (max {layout.max_batch_kv_bytes / 2**30:.2f} GiB of {args.kv_budget}); "
          f"prefill {layout.prefill_tokens:,} of {layout.prompt_tokens:,} prompt tokens "
          f"(saves {layout.saved_prefill_tokens / layout.prompt_tokens:.1%})")

    plan_file_round_trip(table, layout, work.max_tokens, config)

    if args.tokenize_sample > 0:
        rate, sample_tokens = tokenization_rate(work, rng, min(args.tokenize_sample, args.requests))
        threads = os.environ.get("TOKENIZERS_PARALLELISM")
        print(f"tokenization (builtin tokenizer, batch call, TOKENIZERS_PARALLELISM={threads}, {os.cpu_count()} "
              f"cores): {sample_tokens:,} tokens at {rate / 1e6:.2f}M tokens/s")
        print(f"tree+plan is {num_tokens / plan_s / rate:.0f}x faster than tokenization, per token")


if __name__ == "__main__":
    main()
