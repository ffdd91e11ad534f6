#!/usr/bin/env python3
"""End to end, one run, same model directory and workload: batchrun (sharing on and off) against
transformers' generate (batch 16) and, when `--vllm-python` is given, vLLM's CPU build with prefix caching.

Prints a markdown table (seconds, output tokens/s, ratios against each peer) and writes it as JSON. Compare
ratios from one run only: the machines are shared and noisy. Top-level imports are standard library only,
because this file also runs as the vLLM worker under vLLM's own Python.

  python benchmarks/e2e_bench.py                       # small default: a few minutes on 2 cores
  python benchmarks/e2e_bench.py --model-dir DIR --docs 8 --per-doc 16 --prefix 400 --vllm-python ~/vllm/bin/python
  python benchmarks/e2e_bench.py --model-dir DIR --device cuda --dtype bfloat16 --hf-batch 32   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402  (a sibling script, not a package)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = REPO / "build" / "bench"
BUILTIN_TOKENIZER_DIR = REPO / "src" / "batchrun" / "model" / "builtin"
# The 30M-parameter random Llama of DESIGN.md's peer figures, with the built-in tokenizer (vocabulary 4096).
MODEL_SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
               "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096}
HF = "hf generate"
VLLM = "vllm"
BATCHRUN = "batchrun"
BATCHRUN_NO_SHARE = "batchrun --no-share"


# --- the model directory -------------------------------------------------------------------------------------


def make_model_dir(path: Path) -> None:
    """A random-weight Llama (seed 0) saved with save_pretrained, plus the built-in tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN_TOKENIZER_DIR / name, path / name)
    config = LlamaConfig(**MODEL_SHAPE, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)


# --- systems -------------------------------------------------------------------------------------------------


def run_batchrun(*, model_dir: Path, workload_path: Path, work_dir: Path, is_share: bool,
                 env: dict[str, str], dtype: str | None = None, device: str = "auto") -> dict[str, Any]:
    """`batchrun plan`, `batchrun run`, then `batchrun stats --json`, as a user would."""
    stem = work_dir / ("share" if is_share else "noshare")
    plan, out = stem.with_suffix(".plan"), stem.with_suffix(".out.jsonl")
    for p in (plan, out, Path(f"{out}.metrics.jsonl")):
        p.unlink(missing_ok=True)  # a leftover output would be resumed, not recomputed
    cli = [sys.executable, "-m", "batchrun"]
    plan_cmd = [*cli, "plan", str(workload_path), "--model", str(model_dir), "-o", str(plan), "--json"]
    plan_cmd += ([] if is_share else ["--no-share"]) + ([] if dtype is None else ["--dtype", dtype])
    _check(plan_cmd, env)
    t0 = time.perf_counter()
    _check([*cli, "run", "--plan", str(plan), "-o", str(out), "--device", device], env)
    process_s = time.perf_counter() - t0
    stats = json.loads(_check([*cli, "stats", str(out), "--json"], env).strip().splitlines()[-1])
    return {
        "seconds": stats["wall_seconds"], "process_seconds": process_s,
        "prefill_tokens_per_s": _prefill_rate(Path(f"{out}.metrics.jsonl")),
        "output_tokens": stats["output_tokens"], "prompt_tokens": stats["prompt_tokens"],
        "computed_prompt_tokens": stats["computed_prompt_tokens"], "requests": stats["requests"],
        "failed": stats["failed"], "tokens": _batchrun_tokens(out),
    }


def _prefill_rate(metrics: Path) -> float:
    """Tokens per second over the steps that prefill (their decode rows included: every row costs the linear
    layers the same), from the metrics file's step records."""
    tokens = seconds = 0.0
    with open(metrics, encoding="utf-8") as f:
        for rec in map(json.loads, f):
            if rec.get("type") == "step" and rec["num_prefill_tokens"] > 0:
                tokens += rec["num_prefill_tokens"] + rec["num_decode_tokens"]
                seconds += rec["seconds"]
    return tokens / seconds if seconds > 0 else 0.0


def measure_matmul_rate(model_dir: Path, *, dtype: str, threads: int, rows: int = 2048,
                        repeats: int = 5) -> dict[str, float]:
    """The rate of the model's linear layers alone on this machine: one layer's projections (q|k|v, o,
    gate|up, down, as batchrun fuses them) over `rows` tokens, median of `repeats` timings, and the prompt
    tokens/s that rate allows (2 flops per weight per token, every layer). The prefill ceiling to compare
    batchrun's prefill throughput with. OpenMP waits here as in batchrun (set by `import batchrun`)."""
    import batchrun  # noqa: F401, I001  (before torch: it sets how OpenMP threads wait, as a batchrun run does)
    import torch

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    shapes = [(qkv, hidden), (hidden, cfg["num_attention_heads"] * head_dim), (2 * inter, hidden), (hidden, inter)]
    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen).to(torch_dtype) for shape in shapes]
    inputs = [torch.randn(rows, w.shape[1], generator=gen).to(torch_dtype) for w in weights]
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for x, w in zip(inputs, weights, strict=True):
                torch.nn.functional.linear(x, w)
            if i:  # the first round warms the kernels up
                times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    flops_per_token = 2 * sum(a * b for a, b in shapes)
    return {"gflops": flops_per_token * rows / seconds / 1e9,
            "tokens_per_s": rows / seconds / cfg["num_hidden_layers"]}


def _batchrun_tokens(out: Path) -> dict[str, list[int]]:
    tokens = {}
    with open(out, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            if "token_ids" in obj:
                tokens[obj["id"]] = obj["token_ids"]
    return tokens


def run_worker(python: str, worker: str, *, model_dir: Path, workload_path: Path, work_dir: Path,
               extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Runs a peer in its own process (this file in worker mode) and reads its result and output tokens."""
    dump = work_dir / f"{worker}.tokens.jsonl"
    t0 = time.perf_counter()
    stdout = _check([python, str(Path(__file__).resolve()), "--worker", worker, "--model-dir", str(model_dir),
                     "--workload", str(workload_path), "--dump", str(dump), *extra], env)
    # vLLM logs its shutdown to stdout after the result: take the last line that is a JSON object.
    result = json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))
    result["process_seconds"] = time.perf_counter() - t0
    with open(dump, encoding="utf-8") as f:
        result["tokens"] = {r["id"]: r["tokens"] for r in map(json.loads, f)}
    return result


def _check(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"`{' '.join(cmd[:4])} ...` exited {proc.returncode}: " + " | ".join(tail))
    return proc.stdout


# --- workers (run in a subprocess, under the peer's Python) -----------------------------------------------


def _read_rows(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def worker_hf(a: argparse.Namespace) -> dict[str, Any]:
    """transformers' generate: greedy, fixed output length, left-padded batches of requests that ask for
    the same number of tokens (padding is the peer's usual cost, so it stays in). On CUDA, one short generate
    first, untimed: CUDA and cuBLAS set-up stays out of the figure, as batchrun's excludes model loading."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    tok.padding_side = "left"
    dtype = getattr(torch, a.dtype or "float32")
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(device).eval()
    rows = sorted(_read_rows(a.workload), key=lambda r: r["max_tokens"])
    dump: dict[str, list[int]] = {}
    prompt_tokens = output_tokens = 0

    def generate(chunk: list[dict[str, Any]], n: int) -> tuple[Any, Any]:
        enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        return enc, out[:, enc["input_ids"].shape[1]:].cpu()

    with torch.inference_mode():
        if device.type == "cuda" and rows:
            generate(rows[:a.batch], 2)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        i = 0
        while i < len(rows):
            n = rows[i]["max_tokens"]
            chunk = [r for r in rows[i:i + a.batch] if r["max_tokens"] == n]
            i += len(chunk)
            enc, new = generate(chunk, n)
            prompt_tokens += int(enc["attention_mask"].sum())
            output_tokens += new.numel()
            dump.update({r["id"]: o.tolist() for r, o in zip(chunk, new, strict=True)})
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    _dump(a.dump, dump)
    return {"seconds": seconds, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "computed_prompt_tokens": prompt_tokens, "requests": len(rows)}


VLLM_KV_CACHE_GIB = "2"


def worker_vllm(a: argparse.Namespace) -> dict[str, Any]:
    """vLLM's offline LLM.generate with prefix caching, greedy, fixed output length."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", VLLM_KV_CACHE_GIB)
    from vllm import LLM, SamplingParams

    rows = _read_rows(a.workload)
    llm = LLM(model=a.model_dir, dtype=a.dtype or "float32", enable_prefix_caching=True, max_model_len=4096, seed=0)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], min_tokens=r["max_tokens"],
                             ignore_eos=True) for r in rows]
    t0 = time.perf_counter()
    outs = llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    dump = {r["id"]: list(o.outputs[0].token_ids) for r, o in zip(rows, outs, strict=True)}
    _dump(a.dump, dump)
    return {"seconds": seconds, "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "output_tokens": sum(len(t) for t in dump.values()), "requests": len(rows)}


def _dump(path: str, tokens: dict[str, list[int]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rid, ids in tokens.items():
            f.write(json.dumps({"id": rid, "tokens": ids}) + "\n")


# --- the table -----------------------------------------------------------------------------------------------


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: seconds, tokens/s, agreement with transformers' tokens, ratios of tokens/s to each peer."""
    reference = results.get(HF, {}).get("tokens")
    rows: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        if "error" in r:
            rows[name] = {"error": r["error"]}
            continue
        row = {k: r.get(k) for k in ("seconds", "process_seconds", "requests", "prompt_tokens",
                                     "computed_prompt_tokens", "output_tokens", "prefill_tokens_per_s")}
        row["output_tokens_per_s"] = r["output_tokens"] / r["seconds"] if r["seconds"] > 0 else 0.0
        if reference is not None and name != HF:
            same = sum(r["tokens"].get(rid) == ids for rid, ids in reference.items())
            row["same_tokens_as_hf"] = f"{same}/{len(reference)}"
        rows[name] = row
    ok = [n for n, row in rows.items() if "error" not in row]
    for name in ok:
        rows[name]["ratio_vs"] = {
            peer: rows[name]["output_tokens_per_s"] / rows[peer]["output_tokens_per_s"]
            for peer in ok if peer != name and rows[peer]["output_tokens_per_s"] > 0
        }
    return rows


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    ok = [n for n, row in rows.items() if "error" not in row]
    head = ["system", "seconds", "output tok/s", "prompt tok", "computed prompt tok", "process s",
            "same tokens as hf", *[f"vs {p}" for p in ok]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        if "error" in row:
            error = row["error"][:300].replace("|", "\\|")  # a bare | would split the cell
            lines.append(f"| {name} | failed: {error} |" + " |" * (len(head) - 2))
            continue
        ratios = [f"{row['ratio_vs'][p]:.2f}x" if p in row["ratio_vs"] else "" for p in ok]
        cells = [name, f"{row['seconds']:.2f}", f"{row['output_tokens_per_s']:.1f}",
                 _count(row["prompt_tokens"]), _count(row["computed_prompt_tokens"]),
                 f"{row['process_seconds']:.1f}", row.get("same_tokens_as_hf", ""), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _count(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


# --- main ----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload.add_arguments(ap)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="Hugging Face model directory [default: make the random 30M Llama in WORK_DIR]")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every system")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="batchrun run --device, and where transformers runs (vLLM: its CPU build regardless)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="batchrun plan --dtype, and transformers' dtype [default: the model's own for batchrun, "
                    "float32 for transformers]")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--vllm-python", default=None, help="the Python of a vLLM CPU install")
    ap.add_argument("--skip", default="", help="comma-separated systems to leave out: batchrun,noshare,hf")
    ap.add_argument("--json", type=Path, default=None, help="[default: WORK_DIR/e2e_bench.json]")
    # worker mode (internal): run one peer and print its result as one JSON line
    ap.add_argument("--worker", choices=("hf", "vllm"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> int:
    a = parse_args()
    if a.worker is not None:
        a.model_dir = str(a.model_dir)
        result = worker_hf(a) if a.worker == "hf" else worker_vllm(a)
        print(json.dumps(result))
        return 0
    work_dir: Path = a.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = a.model_dir.resolve() if a.model_dir else work_dir / "llama-30m"
    if not (model_dir / "config.json").is_file():
        if a.model_dir:
            print(f"error: {model_dir} has no config.json", file=sys.stderr)
            return 2
        print(f"making the random 30M Llama in {model_dir}", file=sys.stderr)
        make_model_dir(model_dir)
    config = workload.config_from_args(a)
    workload_path = work_dir / "workload.jsonl"
    workload.write_workload(workload.make_workload(config), workload_path)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    skip = set(filter(None, a.skip.split(",")))
    common = {"model_dir": model_dir, "workload_path": workload_path, "work_dir": work_dir, "env": env}
    jobs: dict[str, Any] = {}
    if "batchrun" not in skip:
        jobs[BATCHRUN] = lambda: run_batchrun(is_share=True, dtype=a.dtype, device=a.device, **common)
    if "noshare" not in skip:
        jobs[BATCHRUN_NO_SHARE] = lambda: run_batchrun(is_share=False, dtype=a.dtype, device=a.device, **common)
    if "hf" not in skip:
        extra = ["--threads", str(a.threads), "--batch", str(a.hf_batch), "--device", a.device,
                 *([] if a.dtype is None else ["--dtype", a.dtype])]
        jobs[HF] = lambda: run_worker(sys.executable, "hf", extra=extra, **common)
    notes = []
    if a.vllm_python and Path(a.vllm_python).exists():
        # vLLM's CPU build binds its own OpenMP threads: an OMP_NUM_THREADS setting makes it about 3x slower
        # here (measured: 33 s against 11 s), so it runs with its own defaults.
        vllm_env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        extra = [] if a.dtype is None else ["--dtype", a.dtype]  # the model directory's own dtype is float32
        jobs[VLLM] = lambda: run_worker(a.vllm_python, "vllm", extra=extra, **{**common, "env": vllm_env})
    else:
        notes.append("vllm skipped: " + (f"{a.vllm_python} does not exist" if a.vllm_python
                                         else "no --vllm-python given"))
    results: dict[str, dict[str, Any]] = {}
    for name, job in jobs.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = job()
        except RuntimeError as e:  # one failing system should not lose the others' figures
            results[name] = {"error": str(e)}
    rows = summarize(results)
    print(f"\nworkload: {config.num_requests} requests ({json.dumps(asdict(config))}); model {model_dir}; "
          f"{a.threads} threads; device {a.device}; dtype {a.dtype or 'default'}\n")
    print(markdown_table(rows))
    matmul = None
    if a.device != "cuda":
        matmul = measure_matmul_rate(model_dir, dtype=a.dtype or "float32", threads=a.threads)
        print(f"\nlinear layers alone: {matmul['gflops']:.0f} GFLOP/s, {matmul['tokens_per_s']:.0f} prompt tokens/s")
        for name, r in results.items():
            if r.get("prefill_tokens_per_s"):
                ratio = matmul["tokens_per_s"] / r["prefill_tokens_per_s"]
                rows[name]["matmul_over_prefill"] = ratio
                print(f"{name}: prefill {r['prefill_tokens_per_s']:.0f} tokens/s, the matmul rate is {ratio:.2f}x that")
    for note in notes:
        print(f"\nnote: {note}")
    json_path = a.json or work_dir / "e2e_bench.json"
    json_path.write_text(json.dumps({"workload": asdict(config), "model_dir": str(model_dir),
                                     "threads": a.threads, "device": a.device, "dtype": a.dtype,
                                     "matmul": matmul, "systems": rows, "notes": notes}, indent=2))
    print(f"\nwritten: {json_path}")
    return 1 if any("error" in row for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
