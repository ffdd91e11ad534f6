#!/usr/bin/env python3
"""End-to-end GPU checks of `batchrun run`, one step after another, each step's failure reported in the table
and the next step run regardless (gpu_check.sh calls this; it also runs on its own and, with --tiny, on a CPU):

1. model: a random Llama shaped as Qwen2.5-0.5B's layers (hidden 896, 24 layers, 14 query heads and 2 KV heads:
   GQA ratio 7, head size 64, intermediate 4864; vocabulary 4096 with the built-in tokenizer), made from a seed
   with transformers' LlamaConfig / LlamaForCausalLM and save_pretrained (bf16 weights, exact in float32 too);
2. greedy fp32: `batchrun plan --dtype float32` + `batchrun run --device cuda` on a prefix-sharing workload
   (system prompt → document → question) against transformers' `generate`, request by request, eager attention,
   TF32 off: the token ids must be identical; a divergence is reported with transformers' top-2 logit margin
   at that step (a margin near 0 is a tie that rounding may break either way);
3. greedy bf16: the same in bfloat16 on both sides, where rounding differs: the share of tokens that agree
   (up to each request's first divergence) and whether every divergence is a near-tie (transformers' top-2
   margin there below the median margin of the agreeing steps);
4. throughput: e2e_bench.py in bf16 on a larger prefix-heavy workload: batchrun, batchrun --no-share and
   transformers' generate (batch 32), measured in the same run, after one untimed batchrun run that fills the
   Triton compile cache.

Prints a markdown table last (rows `| e2e ...`, which gpu_check.sh copies into its summary) and writes
OUT_DIR/gpu_e2e.json (results) and OUT_DIR/gpu_e2e.log (every command with its output). Exit code 0 when every
step is ok. Top-level imports are standard library only: torch and transformers are imported by the worker
processes, so a crash or hang there costs one step, not the run.

  python3 benchmarks/gpu_e2e.py                              # on the GPU machine (gpu_check.sh does this)
  python benchmarks/gpu_e2e.py --tiny --device cpu           # the same steps, tiny sizes, on a CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402  (a sibling script, not a package)

REPO = Path(__file__).resolve().parent.parent
BUILTIN_TOKENIZER_DIR = REPO / "src" / "batchrun" / "model" / "builtin"
E2E_BENCH = Path(__file__).resolve().parent / "e2e_bench.py"
STATE_MARK = "GPU_E2E_TORCH_STATE "  # the batchrun worker prints its torch numerics settings after this


@dataclass(frozen=True)
class Preset:
    shape: dict[str, int]
    init_std: float
    greedy: workload.WorkloadConfig
    throughput: workload.WorkloadConfig
    hf_batch: int
    budget_s: float  # the whole script's time, all steps together
    greedy_cap_s: float  # the most each greedy step (fp32, bf16) may take of it
    max_position_embeddings: int = 16384  # Python-source text makes up to ~7 tokens a word: room for outliers


PRESETS = {
    "full": Preset(
        shape=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, vocab_size=4096),
        init_std=0.02,
        # a few documents x 8 questions under a shared system prompt, 32 tokens out; interleaved in the file
        greedy=workload.WorkloadConfig(docs=4, per_doc=8, system=30, prefix=200, suffix=20, out=32,
                                       order="interleaved", seed=1),
        # 16 documents x 32 questions, documents of ~2k tokens (~700 words of Python source), 64 tokens out;
        # grouped in the file so that transformers' batches of 32 hold one document each (little padding)
        throughput=workload.WorkloadConfig(docs=16, per_doc=32, prefix=700, suffix=30, out=64, order="grouped",
                                           seed=2),
        hf_batch=32,
        budget_s=300.0,
        greedy_cap_s=90.0,
    ),
    "tiny": Preset(
        # head size 64 and GQA ratio 7, as the full preset: --tiny --device cuda is a quick smoke test too
        shape=dict(hidden_size=448, intermediate_size=512, num_hidden_layers=2, num_attention_heads=7,
                   num_key_value_heads=1, vocab_size=4096),
        init_std=0.1,
        greedy=workload.WorkloadConfig(docs=2, per_doc=4, system=10, prefix=40, suffix=8, out=8,
                                       order="interleaved", seed=1),
        throughput=workload.WorkloadConfig(docs=2, per_doc=8, prefix=60, suffix=10, out=8, order="grouped", seed=2),
        hf_batch=8,
        budget_s=900.0,
        greedy_cap_s=300.0,
        max_position_embeddings=4096,
    ),
}


# --- running commands ----------------------------------------------------------------------------------------


class StepError(Exception):
    """A step's command failed or ran out of time; the message is one line for the table."""


class Runner:
    """Runs commands in their own process group under a shared deadline; logs each with its whole output."""

    def __init__(self, *, deadline: float, log_path: Path, env: dict[str, str]) -> None:
        self.deadline = deadline
        self.log_path = log_path
        self.env = env
        self.start = time.monotonic()
        self._lock = threading.Lock()  # steps may run two commands at once
        self._procs: set[subprocess.Popen[str]] = set()
        log_path.write_text("")

    def kill_all(self) -> None:
        """Kills every running command with its process group (each runs in a session of its own, which a
        signal to this script's group does not reach)."""
        for proc in list(self._procs):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, line: str) -> None:
        line = f"[gpu_e2e {time.monotonic() - self.start:5.0f}s] {line}"
        print(line, flush=True)
        self._log(line + "\n")

    def _log(self, text: str) -> None:
        with self._lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text)

    def run(self, cmd: list[str], *, cap_s: float, what: str, env: dict[str, str] | None = None) -> tuple[str, str]:
        """(stdout, stderr) of `cmd`; StepError when it exits non-zero or outlives min(cap_s, time left)."""
        limit = min(cap_s, self.remaining())
        if limit < 5:
            raise StepError(f"{what}: not started, out of time")
        self.note(f"{what}: {' '.join(cmd[:3])} ... (limit {limit:.0f}s)")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env or self.env, cwd=REPO, start_new_session=True)
        self._procs.add(proc)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the workers it started go too
            out, err = proc.communicate()
        finally:
            self._procs.discard(proc)
        seconds = time.monotonic() - t0
        self._log(f"$ {' '.join(cmd)}\n# rc {proc.returncode}, {seconds:.1f}s{' (killed: time)' if timed_out else ''}\n"
                  f"## stdout\n{out}\n## stderr\n{err}\n\n")
        if timed_out:
            raise StepError(f"{what}: killed after {seconds:.0f}s (limit {limit:.0f}s); {_tail(out, err)}")
        if proc.returncode != 0:
            raise StepError(f"{what}: exited {proc.returncode} after {seconds:.0f}s: {_tail(out, err)}")
        return out, err


def _tail(out: str, err: str, lines: int = 4) -> str:
    text = [line.strip() for line in (err.strip() or out.strip()).splitlines()
            if line.strip() and not line.startswith(STATE_MARK)]
    return " | ".join(text[-lines:])[-600:] or "no output"


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- step results --------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str  # the table's check column
    status: str = "not run"  # ok, FAILED, MISMATCH, DIVERGES, skipped, not run
    detail: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        return f"| {self.name} | {self.status} | {self.detail.replace('|', '/')} |"


def run_step(step: Step, runner: Runner, fn: Any) -> None:
    if runner.remaining() < 5:
        step.status, step.detail = "FAILED", "not started: out of time"
        runner.note(f"{step.name}: {step.detail}")
        return
    t0 = time.monotonic()
    try:
        fn(step)
        if step.status == "not run":
            step.status = "ok"
    except StepError as e:
        step.status, step.detail = "FAILED", str(e)
    except Exception as e:  # noqa: BLE001  (a bug in a step must not lose the other steps' results)
        step.status, step.detail = "FAILED", f"{type(e).__name__}: {e}"
    step.seconds = time.monotonic() - t0
    runner.note(f"{step.name}: {step.status} ({step.seconds:.0f}s) {step.detail}")


# --- the steps -----------------------------------------------------------------------------------------------


def model_marker(a: argparse.Namespace, preset: Preset) -> dict[str, Any]:
    return {"shape": preset.shape, "init_std": preset.init_std, "seed": a.seed, "weights": "bfloat16",
            "max_position_embeddings": preset.max_position_embeddings}


MARKER_FILE = "gpu_e2e_model.json"


def step_model(step: Step, runner: Runner, a: argparse.Namespace, preset: Preset, model_dir: Path) -> None:
    marker = model_marker(a, preset)
    marker_path = model_dir / MARKER_FILE
    if a.model_dir is not None:
        step.detail = f"given: {model_dir}"
        return
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        step.data = json.loads(marker_path.read_text())
        step.detail = f"reused {model_dir} (same shape and seed)"
        return
    out, _ = runner.run([sys.executable, __file__, "--worker", "make-model", "--model-dir", str(model_dir),
                         "--device", a.device, "--marker", json.dumps(marker)], cap_s=180, what="make model")
    result = _last_json(out)
    step.data = result
    shape = preset.shape
    step.detail = (f"{_params(result['params'])} params (hidden {shape['hidden_size']}, "
                   f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']}/"
                   f"{shape['num_key_value_heads']} heads), made in {result['seconds']:.0f}s; {result['env']}")


def step_greedy(step: Step, runner: Runner, a: argparse.Namespace, preset: Preset, model_dir: Path, work: Path,
                dtype: str) -> None:
    """batchrun and transformers' generate, greedy, in `dtype` on the same workload: float32 must give identical
    tokens; bfloat16 rounds differently on each side and must diverge only at near-ties."""
    config = preset.greedy
    path = work / "greedy.jsonl"
    workload.write_workload(workload.make_workload(config), path)
    plan, out, dump = (work / f"greedy.{dtype}.{ext}" for ext in ("plan", "out.jsonl", "hf.jsonl"))
    for p in (plan, out, Path(f"{out}.metrics.jsonl"), dump):
        p.unlink(missing_ok=True)  # a leftover output would be resumed, not recomputed
    deadline = time.monotonic() + preset.greedy_cap_s
    cap = lambda: max(0.0, deadline - time.monotonic())
    # The reference runs beside batchrun: the GPU holds both, and neither's numerics depend on the other.
    hf_cmd = [sys.executable, __file__, "--worker", "hf-greedy", "--model-dir", str(model_dir), "--workload",
              str(path), "--dump", str(dump), "--device", a.device, "--hf-attn", a.hf_attn, "--hf-dtype", dtype]
    hf_out: list[str | StepError] = [StepError("greedy: transformers generate did not run")]

    def run_reference() -> None:
        try:
            hf_out[0] = runner.run(hf_cmd, cap_s=cap(), what=f"greedy {dtype}: transformers generate")[0]
        except StepError as e:
            hf_out[0] = e

    reference = threading.Thread(target=run_reference, daemon=True)
    reference.start()
    try:
        runner.run([sys.executable, "-m", "batchrun", "plan", str(path), "--model", str(model_dir), "--dtype",
                    dtype, "-o", str(plan), "--json"], cap_s=cap(), what=f"greedy {dtype}: batchrun plan")
        _, err = runner.run([sys.executable, __file__, "--worker", "batchrun", "run", "--plan", str(plan), "-o",
                             str(out), "--device", a.device], cap_s=cap(), what=f"greedy {dtype}: batchrun run")
    finally:
        reference.join()  # never leave it running into the next step
    if isinstance(hf_out[0], StepError):
        raise hf_out[0]
    hf_result = _last_json(hf_out[0])
    state = next((json.loads(line[len(STATE_MARK):]) for line in err.splitlines() if line.startswith(STATE_MARK)), {})
    compare = compare_greedy({r["id"]: r for r in _read_jsonl(out)}, {r["id"]: r for r in _read_jsonl(dump)})
    compare.update(batchrun_torch_state=state, hf=hf_result)
    step.data = compare
    if dtype == "float32":
        fp32_detail(step, compare, state, hf_result, config.out)
    else:
        agreement_detail(step, compare, config.out)


def fp32_detail(step: Step, compare: dict[str, Any], state: dict[str, Any], hf_result: dict[str, Any],
                num_out: int) -> None:
    numerics = (f"batchrun fp32 matmuls IEEE ({_state(state)})" if is_ieee(state)
                else f"batchrun fp32 matmuls MAY BE TF32 ({_state(state)})")
    step.detail = (f"{compare['identical']}/{compare['total']} identical ({num_out} tokens each, "
                   f"{compare['mean_distinct']:.1f} distinct per output; smallest HF top-2 margin of a matched step "
                   f"{compare['min_margin']:.2g}); {numerics}; HF {hf_result['attn']} attention, "
                   f"{'TF32 off' if is_ieee(hf_result['state_after']) else _state(hf_result['state_after'])}")
    if compare["problems"]:
        step.status = "MISMATCH"
        step.detail += "; " + "; ".join(compare["problems"][:6])


def agreement_detail(step: Step, compare: dict[str, Any], num_out: int) -> None:
    """Divergences are expected in bf16; one where transformers' top-2 margin is above the median margin of the
    agreeing steps is not a near-tie and marks the step."""
    tie_bound = compare["median_margin"]
    far = [m for m in compare["divergence_margins"] if not m <= tie_bound]
    step.detail = (f"{compare['agreeing_tokens']}/{compare['total_tokens']} tokens agree up to each request's first "
                   f"divergence ({compare['identical']}/{compare['total']} requests identical, {num_out} tokens "
                   f"each); HF top-2 margin at the divergences: max {max(compare['divergence_margins'], default=0):.2g}"
                   f" against a median {tie_bound:.2g} over the agreeing steps")
    if far or compare["missing"]:
        step.status = "DIVERGES"
        step.detail += "; " + "; ".join(compare["problems"][:6])


def _state(state: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in state.items() if "cudnn" not in k)


def compare_greedy(ours: dict[str, dict[str, Any]], ref: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Request by request: identical token ids? Where not, the first differing step and HF's margin there."""
    problems: list[str] = []
    identical = missing = agreeing_tokens = 0
    min_margin = float("inf")
    distinct, matched_margins, divergence_margins = [], [], []
    for rid, r in ref.items():
        got = ours.get(rid)
        if got is None or "token_ids" not in got:
            problems.append(f"{rid}: {'missing' if got is None else 'error ' + json.dumps(got.get('error'))}")
            missing += 1
            continue
        mine, theirs = got["token_ids"], r["tokens"]
        distinct.append(len(set(theirs)))
        if got["usage"]["prompt_tokens"] != r["prompt_len"]:
            problems.append(f"{rid}: prompt tokens {got['usage']['prompt_tokens']} vs HF {r['prompt_len']}")
        if mine == theirs:
            identical += 1
            agreeing_tokens += len(theirs)
            matched_margins += r["margins"]
            min_margin = min([min_margin, *r["margins"]])
            continue
        k = next((i for i, (x, y) in enumerate(zip(mine, theirs, strict=False)) if x != y), min(len(mine), len(theirs)))
        margin = r["margins"][k] if k < len(r["margins"]) else float("nan")
        agreeing_tokens += k
        matched_margins += r["margins"][:k]
        divergence_margins.append(margin)
        min_margin = min([min_margin, *r["margins"][:k]])
        problems.append(f"{rid} differs from step {k} of {len(theirs)} (HF top-2 margin there {margin:.2g}, "
                        f"{len(mine)} tokens)")
    extra = sorted(set(ours) - set(ref))
    if extra:
        problems.append(f"{len(extra)} output lines not in the reference, e.g. {extra[0]}")
    return {"identical": identical, "total": len(ref), "problems": problems, "missing": missing,
            "agreeing_tokens": agreeing_tokens, "total_tokens": sum(len(r["tokens"]) for r in ref.values()),
            "median_margin": statistics.median(matched_margins) if matched_margins else float("nan"),
            "divergence_margins": divergence_margins,
            "min_margin": min_margin if min_margin != float("inf") else float("nan"),
            "mean_distinct": sum(distinct) / len(distinct) if distinct else 0.0}


def is_ieee(state: dict[str, Any]) -> bool:
    """Plain fp32 matmuls (no TF32) by the settings a torch process reports."""
    return (state.get("float32_matmul_precision") == "highest"
            and state.get("cuda.matmul.fp32_precision", "ieee") in ("ieee", "none")
            and not state.get("cuda.matmul.allow_tf32", False))


SYSTEMS = (  # (e2e_bench.py's name, its --skip for running that one alone), in the order they run
    ("batchrun", "noshare,hf"),
    ("hf generate", "batchrun,noshare"),
    ("batchrun --no-share", "batchrun,hf"),
)


def step_throughput(step: Step, runner: Runner, a: argparse.Namespace, preset: Preset, model_dir: Path,
                    work: Path) -> None:
    """A warm-up batchrun run, then e2e_bench.py once per system (so one that runs out of time loses only its
    own figures), most telling first; ratios of output tokens/s from the systems that finished."""
    config = preset.throughput
    warm_note = warm_up(runner, a, config, model_dir, work)
    bench_dir = work / "bench"
    common = [sys.executable, str(E2E_BENCH), "--model-dir", str(model_dir), "--work-dir", str(bench_dir),
              "--device", a.device, "--dtype", a.tp_dtype, "--hf-batch", str(preset.hf_batch),
              "--threads", str(a.threads), "--docs", str(config.docs), "--per-doc", str(config.per_doc),
              "--prefix", str(config.prefix), "--suffix", str(config.suffix), "--out", str(config.out),
              "--order", config.order, "--seed", str(config.seed)]
    rows: dict[str, dict[str, Any]] = {}
    for i, (name, skip) in enumerate(SYSTEMS):
        left = len(SYSTEMS) - i
        cap = max(runner.remaining() - 45 * (left - 1), runner.remaining() / left)  # keep time for the rest
        bench_json = bench_dir / f"e2e_bench.{skip.replace(',', '_')}.json"
        bench_json.unlink(missing_ok=True)
        try:
            runner.run([*common, "--skip", skip, "--json", str(bench_json)], cap_s=cap,
                       what=f"throughput: {name}")
            rows[name] = json.loads(bench_json.read_text())["systems"][name]
        except StepError as e:  # e2e_bench.py exits 1 when its system failed: the JSON says why
            systems = json.loads(bench_json.read_text())["systems"] if bench_json.is_file() else {}
            rows[name] = {"error": systems.get(name, {}).get("error") or str(e)}
    for name, row in rows.items():
        if "error" not in row:
            row["ratio_vs"] = {peer: row["output_tokens_per_s"] / other["output_tokens_per_s"]
                               for peer, other in rows.items()
                               if peer != name and other.get("output_tokens_per_s")}
    step.data = {"workload": asdict(config), "dtype": a.tp_dtype, "hf_batch": preset.hf_batch, "systems": rows}
    print(throughput_table(rows) + "\n", flush=True)
    parts = []
    main = rows.get("batchrun", {})
    if "output_tokens_per_s" in main:
        parts.append(f"batchrun {main['output_tokens_per_s']:,.0f} out tok/s ({main['seconds']:.2f}s; prompt tokens "
                     f"computed {_k(main['computed_prompt_tokens'])} of {_k(main['prompt_tokens'])})")
        parts += [f"{ratio:.2f}x {peer}" for peer, ratio in main["ratio_vs"].items()]
    parts += [f"{name} FAILED: ...{row['error'][-300:]}" for name, row in rows.items() if "error" in row]
    step.detail = (f"{a.tp_dtype}; {config.num_requests} requests ({config.docs} docs x {config.per_doc}, "
                   f"{config.out} out), HF batch {preset.hf_batch}: " + "; ".join(parts) + warm_note)
    if any("error" in row for row in rows.values()):
        step.status = "FAILED"


def warm_up(runner: Runner, a: argparse.Namespace, config: workload.WorkloadConfig, model_dir: Path,
            work: Path) -> str:
    """One untimed batchrun run, so that neither timed run pays for Triton's compilation: groups of the same
    size, and long unshared prompts (chunked prefill), a few tokens out. Returns a note when it failed."""
    rows = workload.make_workload(workload.WorkloadConfig(docs=2, per_doc=config.per_doc, prefix=200,
                                                          suffix=config.suffix, out=4, seed=3))
    rows += [{**r, "id": f"solo-{r['id']}"} for r in workload.make_workload(
        workload.WorkloadConfig(docs=4, per_doc=1, prefix=config.prefix, suffix=config.suffix, out=4, seed=4))]
    path, plan, out = work / "warmup.jsonl", work / "warmup.plan", work / "warmup.out.jsonl"
    workload.write_workload(rows, path)
    for p in (plan, out, Path(f"{out}.metrics.jsonl")):
        p.unlink(missing_ok=True)
    br = [sys.executable, "-m", "batchrun"]
    try:
        runner.run([*br, "plan", str(path), "--model", str(model_dir), "--dtype", a.tp_dtype, "-o", str(plan)],
                   cap_s=60, what="throughput: warm-up plan")
        runner.run([*br, "run", "--plan", str(plan), "-o", str(out), "--device", a.device],
                   cap_s=90, what="throughput: warm-up run")
    except StepError as e:
        return f" (the warm-up failed: {e})"
    return ""


def throughput_table(rows: dict[str, dict[str, Any]]) -> str:
    names = list(rows)
    head = ["system", "seconds", "output tok/s", "prompt tok", "computed prompt tok", "process s",
            *[f"vs {n}" for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: ...{row['error'][-300:].replace('|', '/')} |" + " |" * (len(head) - 2))
            continue
        ratios = [f"{row['ratio_vs'][n]:.2f}x" if n in row["ratio_vs"] else "" for n in names]
        lines.append("| " + " | ".join([name, f"{row['seconds']:.2f}", f"{row['output_tokens_per_s']:,.1f}",
                                        f"{row['prompt_tokens']:,}", f"{row['computed_prompt_tokens']:,}",
                                        f"{row['process_seconds']:.1f}", *ratios]) + " |")
    return "\n".join(lines)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _k(n: int | None) -> str:
    return "?" if n is None else f"{n / 1000:.0f}k" if n >= 10_000 else str(n)


# --- workers (subprocesses: torch and transformers live here) --------------------------------------------------


def torch_state(torch: Any) -> dict[str, Any]:
    """The settings that decide whether fp32 matmuls run as TF32. Reads the new (fp32_precision) API where it
    exists: reading the legacy allow_tf32 flags after the new API set them can raise."""
    state: dict[str, Any] = {}
    try:
        state["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):
            state["cuda.matmul.fp32_precision"] = matmul.fp32_precision
            state["cudnn.conv.fp32_precision"] = torch.backends.cudnn.conv.fp32_precision
        else:
            state["cuda.matmul.allow_tf32"] = matmul.allow_tf32
            state["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    except Exception as e:  # noqa: BLE001  (a report, never a failure)
        state["error"] = str(e)
    return state


def disable_tf32(torch: Any) -> None:
    """IEEE fp32 everywhere, through one API only (mixing the legacy and the new one can raise)."""
    matmul = torch.backends.cuda.matmul
    try:
        matmul.fp32_precision = "ieee"  # torch >= 2.9
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    except AttributeError:
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def worker_make_model(a: argparse.Namespace) -> dict[str, Any]:
    """A random Llama from a seed, saved with save_pretrained (bf16), with the built-in tokenizer files."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    marker = json.loads(a.marker)
    shape = marker["shape"]
    path = Path(a.model_dir)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(BUILTIN_TOKENIZER_DIR / "tokenizer.json", tmp / "tokenizer.json")
    tok_config = json.loads((BUILTIN_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = marker["max_position_embeddings"]  # no "longer than 2048" warnings
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         max_position_embeddings=marker["max_position_embeddings"], rms_norm_eps=1e-5,
                         rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         tie_word_embeddings=False, initializer_range=marker["init_std"])
    device = torch.device("cuda" if a.device == "cuda" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(marker["seed"])
    with device:  # drawn where it runs: a 1B model's initialisation is slow on a few CPU cores
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp)
    (tmp / MARKER_FILE).write_text(json.dumps(marker))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    env = f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}"
    return {"params": params, "seconds": time.perf_counter() - t0, "env": env, "torch_defaults": torch_state(torch)}


def worker_hf_greedy(a: argparse.Namespace) -> dict[str, Any]:
    """transformers' generate, greedy, in --hf-dtype (fp32: TF32 off), one request at a time (no padding); dumps
    the token ids, the prompt length and the top-2 margin of the scores at every step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = torch_state(torch)
    disable_tf32(torch)
    after = torch_state(torch)
    device = torch.device(a.device)
    tok = AutoTokenizer.from_pretrained(str(a.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(a.model_dir), dtype=getattr(torch, a.hf_dtype),
                                                 attn_implementation=a.hf_attn)
    model = model.to(device).eval()
    t0 = time.perf_counter()
    with torch.inference_mode(), open(a.dump, "w", encoding="utf-8") as f:
        for r in _read_jsonl(Path(a.workload)):
            ids = tok(r["prompt"], return_tensors="pt")["input_ids"].to(device)  # BOS added, as batchrun does
            n = r["max_tokens"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=r.get("min_tokens") or None, do_sample=False,
                                 pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_scores=True)
            top2 = torch.stack([s[0] for s in out.scores]).float().topk(2, dim=-1).values
            f.write(json.dumps({"id": r["id"], "tokens": out.sequences[0, ids.shape[1]:].tolist(),
                                "margins": (top2[:, 0] - top2[:, 1]).tolist(), "prompt_len": ids.shape[1]}) + "\n")
    return {"seconds": time.perf_counter() - t0, "attn": a.hf_attn, "state_before": before,
            "state_after": after}


def worker_batchrun(argv: list[str]) -> int:
    """`batchrun ARGV` in this process, then its torch numerics settings on stderr (what the run used)."""
    sys.argv = ["batchrun", *argv]
    from batchrun.cli import main as batchrun_main

    code: int = 0
    try:
        batchrun_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    import torch

    print(STATE_MARK + json.dumps(torch_state(torch)), file=sys.stderr, flush=True)
    return code


# --- main ----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and workloads (CPU tests, GPU smoke tests)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="use this model directory instead of making the random Llama")
    ap.add_argument("--work-dir", type=Path, default=REPO / "build" / "gpu_e2e",
                    help="model, workloads, plans, outputs (large: keep it out of OUT_DIR)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="gpu_e2e.json and gpu_e2e.log [default: $OUT, else build/gpu_check]")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time for all steps together [default: 300 full, 900 tiny]")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: greedy,bf16,throughput")
    ap.add_argument("--tp-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="dtype of the throughput comparison")
    ap.add_argument("--hf-attn", default="eager", help="transformers attention of the greedy reference")
    ap.add_argument("--threads", type=int, default=8, help="CPU threads (e2e_bench.py --threads)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("make-model", "hf-greedy"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--marker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dtype", default="float32", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> int:
    if sys.argv[1:3] == ["--worker", "batchrun"]:
        return worker_batchrun(sys.argv[3:])
    a = parse_args()
    if a.worker is not None:
        result = worker_make_model(a) if a.worker == "make-model" else worker_hf_greedy(a)
        print(json.dumps(result))
        return 0
    preset = PRESETS["tiny" if a.tiny else "full"]
    out_dir: Path = (a.out_dir or Path(os.environ.get("OUT") or REPO / "build" / "gpu_check")).resolve()
    work: Path = a.work_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = a.model_dir.resolve() if a.model_dir else work / ("llama-tiny" if a.tiny else "llama-0.5b")
    budget = a.budget_s or preset.budget_s
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if a.device == "cuda":
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the CPU interpreter
    runner = Runner(deadline=time.monotonic() + budget, log_path=out_dir / "gpu_e2e.log", env=env)

    def on_signal(signum: int, frame: Any) -> None:  # `timeout` or Ctrl-C: leave nothing running on the GPU
        runner.kill_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    skip = set(filter(None, a.skip.split(",")))
    runner.note(f"{'tiny' if a.tiny else 'full'} preset on {a.device}, budget {budget:.0f}s, model {model_dir}")

    model = Step("e2e model")
    greedy = Step("e2e greedy fp32 vs transformers")
    bf16 = Step("e2e greedy bf16 agreement")
    throughput = Step(f"e2e throughput {a.tp_dtype}")
    run_step(model, runner, lambda s: step_model(s, runner, a, preset, model_dir))
    for step, name, fn in (
        (greedy, "greedy", functools.partial(step_greedy, dtype="float32")),
        (bf16, "bf16", functools.partial(step_greedy, dtype="bfloat16")),
        (throughput, "throughput", step_throughput),
    ):
        if name in skip:
            step.status, step.detail = "skipped", "--skip"
        elif model.status != "ok":
            step.detail = "no model"
        else:
            run_step(step, runner, lambda s, fn=fn: fn(s, runner, a, preset, model_dir, work))
    steps = [model, greedy, bf16, throughput]
    (out_dir / "gpu_e2e.json").write_text(json.dumps({
        "preset": "tiny" if a.tiny else "full", "device": a.device, "model_dir": str(model_dir),
        "shape": preset.shape, "greedy_workload": asdict(preset.greedy),
        "throughput_workload": asdict(preset.throughput), "hf_batch": preset.hf_batch,
        "steps": [asdict(s) for s in steps],
    }, indent=1, default=str))
    print("\n| check | status | detail |\n| --- | --- | --- |")
    for s in steps:
        print(s.row())
    print(f"\nwritten: {out_dir / 'gpu_e2e.json'}, {out_dir / 'gpu_e2e.log'}")
    return 0 if all(s.status in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
