"""Scale-out. Units against brute force (partition, cost = the planner's kv_tokens, prefixes computed once except
above a split, longest-first dispatch, the pull schedule's bound), sub-plans against the whole plan, and runs
on a local Ray cluster of 2 CPU workers: the same greedy outputs as one engine, a worker killed mid-run, the
driver killed and resumed, every worker gone."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson
import pytest
import ray
import torch
from rich.console import Console

from batchrun.distributed.driver import BatchEvent, ClusterOutcome, run_distributed
from batchrun.distributed.subplan import slice_plan
from batchrun.distributed.units import (
    UnitConfig,
    WorkUnits,
    dispatch_order,
    load_balance,
    make_units,
    simulate_pull,
    unit_config,
)
from batchrun.errors import UserError
from batchrun.metrics import MetricsRecorder, metrics_path_for
from batchrun.model.spec import resolve_model
from batchrun.planfile import save_plan
from batchrun.planner import PlanLayout, PlannerConfig, kv_tokens, plan_requests
from batchrun.planning import build_plan
from batchrun.requests import Request, SamplingParams
from batchrun.runner import run_plan_file
from batchrun.stats import load_report, report_json
from batchrun.stats_view import render_report
from batchrun.tokenizer import load_tokenizer
from batchrun.tokens import TokenTable
from checkpoints import make_checkpoint

# -- pure: units and sub-plans ---------------------------------------------------------------------------------


def hierarchical(rng: np.random.Generator, num_requests: int) -> list[list[int]]:
    """system → document → question prompts (some requests without a system prompt or a document)."""
    piece = lambda lo, hi: rng.integers(2, 500, int(rng.integers(lo, hi))).tolist()
    systems = [piece(3, 12) for _ in range(int(rng.integers(1, 4)))]
    docs = [piece(2, 10) for _ in range(int(rng.integers(1, 8)))]
    seqs = []
    for _ in range(num_requests):
        system = systems[rng.integers(len(systems))] if rng.random() < 0.9 else []
        doc = docs[rng.integers(len(docs))] if rng.random() < 0.8 else []
        seqs.append(system + doc + piece(1, 6))
    return seqs


def random_plan(rng: np.random.Generator, num_requests: int) -> tuple[PlanLayout, np.ndarray, np.ndarray, int]:
    seqs = hierarchical(rng, num_requests)
    table = TokenTable.from_lists(seqs)
    max_tokens = rng.integers(1, 12, num_requests)
    budget = int(table.lengths.max(initial=1) + max_tokens.max(initial=1) + rng.integers(0, 120))
    config = PlannerConfig(kv_budget_bytes=budget, min_prefix_len=int(rng.integers(1, 4)),
                           max_levels=int(rng.integers(1, 4)), share=bool(rng.random() < 0.9))
    layout = plan_requests(table, max_tokens, kv_bytes_per_token=1, config=config)
    return layout, table.lengths.astype(np.int64), max_tokens.astype(np.int64), budget


def readers(layout: PlanLayout, requests: np.ndarray) -> set[int]:
    """Every shared node the requests read (whole chains): the brute-force reference."""
    out = set()
    for r in requests.tolist():
        v = int(layout.request_node[r])
        while v >= 0:
            out.add(v)
            v = int(layout.node_parent[v])
    return out


def check_units(layout: PlanLayout, prompt_len: np.ndarray, max_tokens: np.ndarray, units: WorkUnits,
                config: UnitConfig) -> None:
    num_requests = len(layout.order)
    if num_requests == 0:
        assert len(units) == 0
        return
    assert units.start[0] == 0 and units.end[-1] == num_requests and np.all(units.start < units.end)
    assert np.array_equal(units.start[1:], units.end[:-1])  # a partition of the order
    span = layout.forest.spans(layout.order)
    total = int(layout.prefill_tokens + max_tokens.sum())
    split_above = max(config.target(total), config.kv_budget_tokens)  # the largest target: the first
    seen_by: dict[int, int] = {}
    for u in range(len(units)):
        rows = layout.order[units.start[u]:units.end[u]]
        assert units.cost[u] == kv_tokens(layout, prompt_len=prompt_len, max_tokens=max_tokens, requests=rows)
        assert units.decode_tokens[u] == max_tokens[rows].sum()
        for v in readers(layout, rows):
            seen_by[v] = seen_by.get(v, 0) + 1
            if not units.is_wave[u]:  # a whole pack of groups reads only nodes wholly inside it
                assert units.start[u] <= span.first[v] and span.end[v] <= units.end[u]
        is_one_item = len(rows) == 1 or any(span.first[v] == units.start[u] and span.end[v] == units.end[u]
                                            for v in readers(layout, rows))
        assert units.cost[u] <= (split_above if units.is_wave[u] else config.target(total)) or is_one_item
    for v, count in seen_by.items():
        if count > 1:  # computed by several units: only a node that was split (too big for one)
            members = layout.order[span.first[v]:span.end[v]]
            lowest = max(config.min_cost, config.kv_budget_tokens)  # the split bound only falls as units are cut
            assert kv_tokens(layout, prompt_len=prompt_len, max_tokens=max_tokens, requests=members) > lowest
    extra = int(units.prefill_tokens.sum()) - layout.prefill_tokens
    assert extra >= 0 and (extra == 0 or units.is_wave.any())


def test_random_units_partition_the_plan_and_cost_what_the_planner_counts() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        layout, prompt_len, max_tokens, budget = random_plan(rng, int(rng.integers(0, 40)))
        config = unit_config(layout, max_tokens=max_tokens, kv_budget_tokens=budget,
                             num_workers=int(rng.integers(1, 6)), tail_units_per_worker=int(rng.integers(1, 9)))
        units = make_units(layout, prompt_len=prompt_len, max_tokens=max_tokens, config=config)
        check_units(layout, prompt_len, max_tokens, units, config)


def test_a_group_within_the_budget_is_never_split() -> None:
    rng = np.random.default_rng(1)
    seqs = [[7] * 30 + [int(x)] for x in rng.integers(10, 99, 12)]  # one group of 12
    table = TokenTable.from_lists(seqs)
    max_tokens = np.full(12, 4)
    layout = plan_requests(table, max_tokens, kv_bytes_per_token=1,
                           config=PlannerConfig(kv_budget_bytes=10_000, min_prefix_len=4, max_levels=2, share=True))
    config = UnitConfig(kv_budget_tokens=10_000, min_cost=5)  # far below the group's cost
    units = make_units(layout, prompt_len=table.lengths, max_tokens=max_tokens, config=config)
    assert len(units) == 1 and not units.is_wave.any() and units.prefill_tokens[0] == layout.prefill_tokens
    # Above the budget it is split into waves, each computing the 30-token prefix again.
    small = UnitConfig(kv_budget_tokens=40, min_cost=20)
    waves = make_units(layout, prompt_len=table.lengths, max_tokens=max_tokens, config=small)
    check_units(layout, table.lengths, max_tokens, waves, small)
    assert len(waves) == 6 and waves.is_wave.all()  # 2 requests (30 + 2 * 5 tokens) per wave of the budget
    assert waves.prefill_tokens.sum() - layout.prefill_tokens == 30 * (len(waves) - 1)


def test_a_split_group_does_not_split_its_documents() -> None:
    """system (40) → 3 documents (30) → 4 questions each: waves repeat the system prompt, never a document."""
    seqs = [[1] * 40 + [2 + d] * 30 + [100 + 10 * d + q] for d in range(3) for q in range(4)]
    table = TokenTable.from_lists(seqs)
    max_tokens = np.full(len(seqs), 2)
    layout = plan_requests(table, max_tokens, kv_bytes_per_token=1,
                           config=PlannerConfig(kv_budget_bytes=200, min_prefix_len=4, max_levels=2, share=True))
    config = UnitConfig(kv_budget_tokens=100, min_cost=40 + 30 + 4 * 3)  # one document per unit
    units = make_units(layout, prompt_len=table.lengths, max_tokens=max_tokens, config=config)
    check_units(layout, table.lengths, max_tokens, units, config)
    assert len(units) == 3 and units.prefill_tokens.sum() - layout.prefill_tokens == 2 * 40


def test_dispatch_is_largest_first_and_the_pull_schedule_is_balanced() -> None:
    rng = np.random.default_rng(2)
    layout, prompt_len, max_tokens, budget = random_plan(rng, 40)
    units = make_units(layout, prompt_len=prompt_len, max_tokens=max_tokens,
                       config=UnitConfig(kv_budget_tokens=budget, min_cost=30))
    order = dispatch_order(units)
    assert sorted(order.tolist()) == list(range(len(units)))
    assert np.all(np.diff(units.cost[order]) <= 0)
    for num_workers in (1, 3, 7):
        load = simulate_pull(units.cost[order], num_workers=num_workers)
        assert load.sum() == units.cost.sum()
        assert load.max() <= load.mean() + units.cost.max()  # list scheduling's bound
    assert simulate_pull(np.array([5, 4, 3, 3, 2]), num_workers=2).tolist() == [5 + 3, 4 + 3 + 2]
    assert load_balance(np.array([2.0, 2.0])) == 1.0 and load_balance(np.zeros(3)) == 1.0


def request(i: int, max_tokens: int) -> Request:
    return Request(line=i + 1, id=f"r{i}", format="plain", endpoint="completions",
                   sampling=SamplingParams(max_tokens=max_tokens), model=None)


def test_sub_plans_read_what_the_whole_plan_reads() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        seqs = hierarchical(rng, int(rng.integers(1, 30)))
        table = TokenTable.from_lists(seqs)
        max_tokens = rng.integers(1, 9, len(seqs))
        budget = int(table.lengths.max() + 9 + rng.integers(0, 60))
        layout = plan_requests(table, max_tokens, kv_bytes_per_token=3, config=PlannerConfig(
            kv_budget_bytes=3 * budget, min_prefix_len=2, max_levels=3, share=True))
        requests = [request(i, int(m)) for i, m in enumerate(max_tokens)]
        a, b = sorted(rng.integers(0, len(seqs) + 1, 2).tolist())
        rows = layout.order[a:b + 1].astype(np.int64)
        rows = rows[rng.random(len(rows)) < 0.8]  # a re-queued remainder is any subset, in plan order
        sub = slice_plan(requests=requests, tokens=table, layout=layout, rows=rows, kv_budget_tokens=budget,
                         kv_bytes_per_token=3)
        sl = sub.layout
        assert [r.id for r in sub.requests] == [f"r{r}" for r in rows.tolist()]
        for i, r in enumerate(rows.tolist()):
            assert sub.tokens[i].tolist() == seqs[r]
            assert chain_lens(sl, i) == chain_lens(layout, r)  # the same prefixes, renumbered
        for v in range(len(sl.node_len)):
            reader = int(sl.node_request[v])
            assert v in readers(sl, np.array([reader]))
        for s, e in zip(sl.batch_indptr[:-1], sl.batch_indptr[1:], strict=True):
            assert kv_tokens(sl, prompt_len=sub.tokens.lengths, max_tokens=max_tokens[rows],
                             requests=sl.order[s:e]) * 3 <= sl.max_batch_kv_bytes <= 3 * budget
        assert sl.prefill_tokens == kv_tokens(sl, prompt_len=sub.tokens.lengths, max_tokens=np.zeros(len(rows)),
                                              requests=np.arange(len(rows)))


def chain_lens(layout: PlanLayout, r: int) -> list[int]:
    out, v = [], int(layout.request_node[r])
    while v >= 0:
        out.append(int(layout.node_len[v]))
        v = int(layout.node_parent[v])
    return out[::-1]


def test_metrics_keep_worker_steps_in_time_order_and_per_worker_totals(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "text": "", "token_ids": [5], "finish_reason": "length", '
                    b'"usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n')
    with MetricsRecorder(metrics_path_for(out), run_info={"workers": 2}) as metrics:
        for t, worker in ((0.5, 1), (0.2, 0), (0.9, 0)):  # batches from two workers arrive out of time order
            metrics.record_step(seconds=0.1, num_running=1, num_decode_tokens=1, num_prefill_tokens=0, kv_bytes=8,
                                t=t, worker=worker)
        metrics.record_worker(worker=0, node="n0", device="cpu", units=2, requests=1, busy_seconds=0.5,
                              computed_prompt_tokens=3, output_tokens=2, is_lost=False)
        metrics.record_worker(worker=1, node="n1", device="cpu", units=1, requests=0, busy_seconds=0.0,
                              computed_prompt_tokens=0, output_tokens=0, is_lost=True)
        metrics.close(wall_seconds=1.0, prompt_tokens=3, computed_prompt_tokens=3, output_tokens=2,
                      peak_kv_bytes=8)
    report = load_report(out)
    assert report.steps.t.tolist() == [0.2, 0.5, 0.9]
    workers = report_json(report)["workers"]
    assert [(w["worker"], w["node"], w["is_lost"], w["output_tokens_per_s"]) for w in workers] == [
        (0, "n0", False, 4.0), (1, "n1", True, 0.0)]
    console = Console(record=True, width=120)
    render_report(console, report)
    assert "workers (distributed runs)" in console.export_text()


# -- on a local Ray cluster of 2 CPU workers ---------------------------------------------------------------------

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


class Job(NamedTuple):
    plan: Path
    reference: dict  # a single engine's (no Ray) output lines, by key
    num_lines: int


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """3 documents asked 5 greedy questions each (a document group is bigger than the KV budget), 4 lone
    prompts and a bad line; the reference output comes from one engine in this process."""
    tmp = tmp_path_factory.mktemp("distributed")
    model = make_checkpoint(tmp, "llama")
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(WORDS, n).tolist())
    lines = [{"id": f"d{d}q{q}", "prompt": f"{doc}\nQ: {text(6)}", "max_tokens": int(rng.integers(2, 12)),
              "temperature": 0} for d, doc in enumerate(text(40) for _ in range(3)) for q in range(5)]
    lines += [{"id": f"solo{i}", "prompt": text(12), "max_tokens": int(rng.integers(2, 12)), "temperature": 0}
              for i in range(4)]
    order = rng.permutation(len(lines)).tolist()
    source = tmp / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps(lines[i]) + b"\n" for i in order) + b"{not json\n")
    spec = resolve_model(str(model))
    config = PlannerConfig(kv_budget_bytes=180 * spec.config.kv_bytes_per_token, min_prefix_len=8, max_levels=2,
                           share=True)
    plan = build_plan(source, spec, load_tokenizer(spec), config)
    assert not any(i.code == "kv_budget_exceeded" for i in plan.invalid)
    plan_path = tmp / "job.plan"
    save_plan(plan, plan_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs; a shared 2-core machine also thrashes with 2 threads
    try:
        run_plan_file(plan_path, tmp / "single.jsonl", errors_path=None, model=None, device="cpu", console=QUIET)
    finally:
        torch.set_num_threads(threads)
    return Job(plan_path, output_lines(tmp / "single.jsonl"), len(lines) + 1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


QUIET = Console(stderr=True, quiet=True)


def output_lines(path: Path) -> dict:
    """Output lines by id (errors by input line); asserts that none is there twice."""
    out: dict = {}
    for raw in path.read_bytes().splitlines():
        obj = orjson.loads(raw)
        key = ("error", obj["line"]) if obj.get("error") else obj["id"]
        assert key not in out, f"{key} written twice"
        out[key] = {k: obj[k] for k in ("token_ids", "text", "finish_reason") if k in obj} or obj["error"]
    return out


def run(job: Job, out: Path, **kw: object) -> ClusterOutcome:
    options = {"errors_path": None, "model": None, "device": "cpu", "workers": 2, "ray_address": None,
               "console": QUIET, "tail_units_per_worker": 2, **kw}
    return run_distributed(job.plan, out, **options)  # type: ignore[arg-type]


def test_greedy_outputs_equal_a_single_engine_run(job: Job, cluster: None, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    outcome = run(job, out)
    assert output_lines(out) == job.reference
    assert (outcome.num_completed, outcome.num_failed, outcome.num_workers_lost) == (job.num_lines - 1, 1, 0)
    report = load_report(out)
    workers = report_json(report)["workers"]
    assert [w["worker"] for w in workers] == [0, 1] and sum(w["requests"] for w in workers) == job.num_lines - 1
    assert sum(w["units"] for w in workers) == outcome.num_units
    assert report.output_tokens == sum(len(v["token_ids"]) for v in job.reference.values() if "token_ids" in v)
    again = run(job, out)  # resume: everything is done, no worker starts, nothing is written
    assert (again.num_resumed, again.num_completed, again.num_workers) == (job.num_lines, 0, 0)
    assert output_lines(out) == job.reference


def test_a_worker_killed_mid_unit_loses_and_repeats_nothing(job: Job, cluster: None, tmp_path: Path) -> None:
    killed: list[int] = []

    def kill_once(event: BatchEvent) -> None:
        if not killed and event.num_unit_remaining > 0:
            ray.kill(event.actor)
            killed.append(event.worker)

    out = tmp_path / "out.jsonl"
    outcome = run(job, out, tail_units_per_worker=1, results_per_batch=1, on_batch=kill_once)
    assert killed and outcome.num_workers_lost == 1 and outcome.num_requeued > 0
    assert output_lines(out) == job.reference  # every line exactly once, the same greedy tokens
    lost = [w for w in report_json(load_report(out))["workers"] if w["is_lost"]]
    assert [w["worker"] for w in lost] == killed


def test_every_worker_gone_stops_with_a_message_and_resume_finishes(job: Job, cluster: None, tmp_path: Path) -> None:
    killed: set[int] = set()

    def kill_each(event: BatchEvent) -> None:
        if event.worker not in killed:
            ray.kill(event.actor)
            killed.add(event.worker)

    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match="every worker died .* run again to resume"):
        run(job, out, results_per_batch=1, on_batch=kill_each)
    partial = output_lines(out)
    assert len(partial) < job.num_lines and all(job.reference[k] == v for k, v in partial.items())
    outcome = run(job, out)
    assert outcome.num_resumed == len(partial) and output_lines(out) == job.reference


DRIVER = """
import sys, time
from pathlib import Path
from rich.console import Console
from batchrun.distributed.driver import run_distributed
run_distributed(Path(sys.argv[1]), Path(sys.argv[2]), errors_path=None, model=None, device="cpu", workers=2,
                ray_address=None, console=Console(quiet=True), tail_units_per_worker=2, results_per_batch=1,
                on_batch=lambda event: time.sleep(0.5))  # slow: the test kills this driver mid-run
"""


def test_resume_after_the_driver_is_killed(job: Job, cluster: None, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    driver = _start_driver(job, out)
    try:
        _wait_for_lines(driver, out, 4)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    partial = output_lines(out)
    assert 4 <= len(partial) < job.num_lines
    outcome = run(job, out)
    assert outcome.num_resumed == len(partial) and output_lines(out) == job.reference


def test_the_local_ray_cluster_goes_when_the_driver_is_killed(job: Job, cluster: None, tmp_path: Path) -> None:
    """kill -9 of the driver alone (not its group): the watchdog kills the Ray processes it had started."""
    from batchrun.distributed.watchdog import descendants

    out = tmp_path / "out.jsonl"
    driver = _start_driver(job, out)
    try:
        _wait_for_lines(driver, out, 2)
        ray_pids = [p for p in descendants([driver.pid]) if p != driver.pid and _is_ray(p)]
        assert ray_pids, "a local cluster runs under its driver"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while (alive := [p for p in ray_pids if _is_running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"Ray processes left running: {alive}"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # whatever is left of its group (nothing, if the test passed)


def _start_driver(job: Job, out: Path) -> subprocess.Popen:
    # Its own session, so that killing the group takes the Ray processes this driver started with it.
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(job.plan), str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_lines(driver: subprocess.Popen, out: Path, num_lines: int) -> None:
    deadline = time.monotonic() + 90
    while not (out.is_file() and out.read_bytes().count(b"\n") >= num_lines):
        assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
        assert time.monotonic() < deadline, "the driver wrote nothing in 90 s"
        time.sleep(0.05)


def _is_ray(pid: int) -> bool:
    try:
        return "watchdog" not in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
