#!/usr/bin/env python3
"""n samples of one request against n copies of it without sharing: the same tokens (sample i has seed s + i,
copy i seed s + i), the prompt prefilled once instead of n times, and the speedup.

  python benchmarks/n_bench.py                          # built-in model, 8 samples of a ~2000-token prompt, CPU
  python benchmarks/n_bench.py --model-dir DIR --device cuda --words 3000 --max-tokens 64

Prints a markdown table; compare ratios from one run only (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import orjson
import torch

from batchrun.engine.engine import Engine
from batchrun.model.loader import load_model
from batchrun.model.spec import resolve_model
from batchrun.output import OutputWriter
from batchrun.planner import PlannerConfig
from batchrun.planning import build_plan
from batchrun.runner import resolve_device
from batchrun.tokenizer import load_tokenizer


def prompt_text(num_words: int) -> str:
    words = Path(os.__file__).read_text().split()
    return " ".join(words[:num_words])


def run_job(tmp: Path, name: str, rows: list[dict], *, share: bool, spec, tokenizer, model, budget: int
            ) -> tuple[dict, list[dict]]:
    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = build_plan(path, spec, tokenizer, PlannerConfig(kv_budget_bytes=budget, min_prefix_len=16, max_levels=4,
                                                           share=share))
    out = tmp / f"{name}.out.jsonl"
    with OutputWriter(out, model_name=spec.name) as writer:
        summary = Engine(model, tokenizer, plan, kv_budget_bytes=budget).run(writer)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    figures = {"prompt_tokens": summary.prompt_tokens, "computed_prompt_tokens": summary.computed_prompt_tokens,
               "output_tokens": summary.output_tokens, "seconds": summary.wall_seconds, "steps": summary.num_steps}
    return figures, [orjson.loads(line) for line in out.read_bytes().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="builtin-tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--words", type=int, default=700, help="prompt length in words (about 2.5 tokens each)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = resolve_model(a.model_dir, dtype=a.dtype)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, device=resolve_device(a.device))
    budget = 8 << 30
    sampling = {"max_tokens": a.max_tokens, "min_tokens": a.max_tokens, "temperature": 0.8}
    text = prompt_text(a.words)
    jobs = {
        f"n={a.n}": ([{"id": "q", "prompt": text, "n": a.n, "seed": 100, **sampling}], True),
        f"{a.n} copies, no sharing": ([{"id": f"c{i}", "prompt": text, "seed": 100 + i, **sampling}
                                       for i in range(a.n)], False),
    }
    kw = dict(spec=spec, tokenizer=tokenizer, model=model, budget=budget)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        run_job(tmp, "warmup", [{"id": "w", "prompt": text[:200], "max_tokens": 2}], share=True, **kw)
        results = {name: run_job(tmp, f"job{i}", rows, share=share, **kw)
                   for i, (name, (rows, share)) in enumerate(jobs.items())}
    (figures_n, (line,)), (figures_copies, copies) = results.values()
    same = [c["token_ids"] for c in line["choices"]] == [c["token_ids"] for c in sorted(copies,
                                                                                       key=lambda c: int(c["id"][1:]))]
    print(f"{spec.name} on {model.device}, prompt {figures_n['prompt_tokens'] // a.n} tokens, n={a.n}, "
          f"{a.max_tokens} output tokens each; samples equal to the seeded copies: {same}\n")
    print("| job | prompt tokens | computed prompt tokens | output tokens | steps | seconds | speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = figures_copies["seconds"]
    for name, (f, _) in results.items():
        print(f"| {name} | {f['prompt_tokens']} | {f['computed_prompt_tokens']} | {f['output_tokens']} | "
              f"{f['steps']} | {f['seconds']:.2f} | {base / f['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
