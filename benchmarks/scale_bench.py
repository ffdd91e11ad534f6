"""Scale-out, planned: a million requests cut into units for 64 workers with the cost model, and the driver's
dynamic pull schedule simulated (no model runs): load balance and prefix tokens computed more than once,
beside the simpler policies from the same run. With --speedup, also 1 and 2 Ray CPU workers against one
engine on a small real workload, as a sanity figure only (a shared 2-core machine is no place for timings).

    .venv/bin/python benchmarks/scale_bench.py [--requests 1000000] [--workers 64] [--speedup]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from batchrun import defaults
from batchrun.distributed.units import (
    WorkUnits,
    dispatch_order,
    load_balance,
    make_units,
    simulate_pull,
    unit_config,
)
from batchrun.kv_accounting import KVAccounting, RangeCost
from batchrun.planner import PlanLayout, PlannerConfig, plan_requests
from batchrun.sizes import parse_size

sys.path.insert(0, str(Path(__file__).parent))
from plan_bench import KV_BYTES_PER_TOKEN, Workload, synthetic_tokens, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--kv-budget", default=defaults.KV_BUDGET, help="one worker's KV budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speedup", action="store_true", help="also run 1 and 2 Ray CPU workers (needs ray)")
    args = parser.parse_args()
    simulate(args)
    if args.speedup:
        speedup()


# --- the planning simulation --------------------------------------------------------------------------------


def simulate(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    work = Workload(args.requests, rng)
    table, gen_s = timed(lambda: synthetic_tokens(work, rng, args.vocab))
    budget_bytes = parse_size(args.kv_budget)
    config = PlannerConfig(kv_budget_bytes=budget_bytes, min_prefix_len=defaults.MIN_PREFIX_LEN,
                           max_levels=defaults.MAX_LEVELS, share=True)
    start = time.perf_counter()
    layout = plan_requests(table, work.max_tokens, kv_bytes_per_token=KV_BYTES_PER_TOKEN, config=config)
    plan_s = time.perf_counter() - start
    prompt_len, max_tokens = table.lengths.astype(np.int64), work.max_tokens.astype(np.int64)
    del table  # units need the layout and the lengths only
    print(f"workload: {args.requests:,} requests (made in {gen_s:.1f} s, planned in {plan_s:.1f} s): "
          f"{layout.num_groups:,} groups, {layout.num_shared_nodes:,} shared nodes, {layout.num_levels} levels, "
          f"{layout.prefill_tokens:,} prefill + {int(max_tokens.sum()):,} decode tokens")
    budget_tokens = budget_bytes // KV_BYTES_PER_TOKEN
    ucfg = unit_config(layout, max_tokens=max_tokens, kv_budget_tokens=budget_tokens, num_workers=args.workers)
    total = layout.prefill_tokens + int(max_tokens.sum())
    units, units_s = timed(lambda: make_units(layout, prompt_len=prompt_len, max_tokens=max_tokens, config=ucfg))
    costs = KVAccounting(layout.forest, prompt_len=prompt_len, max_tokens=max_tokens).ranges(layout.order)
    print(f"units: {len(units):,} in {units_s:.2f} s (target cost {ucfg.target(total):,} down to "
          f"{ucfg.min_cost:,} tokens, KV budget "
          f"{budget_tokens:,} tokens), {int(units.is_wave.sum()):,} of them waves of split groups; cost per unit "
          f"min {units.cost.min():,} / median {int(np.median(units.cost)):,} / max {units.cost.max():,}")
    check_no_prefix_twice(layout, units, costs, split_above=max(ucfg.min_cost, budget_tokens))

    batch_waves = plan_batch_waves(layout, costs)
    group_costs = np.array([costs.cost(a, b) for a, b in
                            zip(layout.group_indptr[:-1].tolist(), layout.group_indptr[1:].tolist(), strict=True)])
    rows = [
        ("ours: pull, largest first", units.cost[dispatch_order(units)], units, None),
        ("pull, plan order", units.cost, units, None),
        ("plan batches as units, pull largest first", np.sort(batch_waves.cost)[::-1], batch_waves, None),
        ("static: whole groups round robin", None, None, np.bincount(np.arange(len(group_costs)) % args.workers,
                                                                      group_costs, minlength=args.workers)),
    ]
    shared_tokens = int(layout.forest.segment_len.sum())
    print(f"\n{args.workers} workers; cost = prefill tokens (each shared segment once per unit + own) + max_tokens")
    print("| policy | units | max/mean load | prefix tokens computed again | share of shared-prefix tokens |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, dispatched, cut, static_load in rows:
        load = static_load if static_load is not None else simulate_pull(dispatched, num_workers=args.workers)
        extra = int(cut.prefill_tokens.sum()) - layout.prefill_tokens if cut is not None else 0
        count = len(cut) if cut is not None else len(group_costs)
        print(f"| {name} | {count:,} | {load_balance(load):.4f} | {extra:,} | {extra / shared_tokens:.3%} |")


def check_no_prefix_twice(layout: PlanLayout, units: WorkUnits, costs: RangeCost, *, split_above: int) -> None:
    """Counts the shared nodes computed by more than one unit, and checks that each was split (too big)."""
    span = costs.span
    lo = np.searchsorted(units.start, span.first, side="right") - 1
    hi = np.searchsorted(units.start, span.end - 1, side="right") - 1
    many = np.flatnonzero(hi > lo)
    is_split = [costs.cost(int(span.first[n]), int(span.end[n])) > split_above for n in many.tolist()]
    assert all(is_split), "a node computed by several units although it was not split"
    print(f"shared nodes computed by more than one unit: {len(many):,} of {len(span.first):,}, every one a split "
          f"node (a group or node above the split bound); the most units reading one node: "
          f"{int((hi - lo + 1).max()) if len(lo) else 0:,}")


def plan_batch_waves(layout: PlanLayout, costs: RangeCost) -> WorkUnits:
    """The alternative cut: every group cut at the plan's batch boundaries inside it (no packing)."""
    bounds = np.union1d(layout.group_indptr, layout.batch_indptr).astype(np.int64)
    start, end = bounds[:-1], bounds[1:]
    prefill = np.array([costs.prefill(a, b) for a, b in zip(start.tolist(), end.tolist(), strict=True)], np.int64)
    decode = np.array([costs.decode(a, b) for a, b in zip(start.tolist(), end.tolist(), strict=True)], np.int64)
    return WorkUnits(start, end, prefill, decode, np.ones(len(start), bool))


# --- a real run: 1 and 2 Ray workers against one engine ----------------------------------------------------------


def speedup() -> None:
    import torch
    from rich.console import Console

    from batchrun.distributed.driver import run_distributed
    from batchrun.model.spec import resolve_model
    from batchrun.planfile import save_plan
    from batchrun.planning import build_plan
    from batchrun.runner import run_plan_file
    from batchrun.tokenizer import load_tokenizer
    from workload import WorkloadConfig, make_workload, write_workload

    quiet = Console(stderr=True, quiet=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        source = tmp / "in.jsonl"
        write_workload(make_workload(WorkloadConfig(docs=16, per_doc=8, prefix=150, suffix=15, out=48)), source)
        spec = resolve_model(defaults.BUILTIN_MODEL)
        plan = build_plan(source, spec, load_tokenizer(spec), PlannerConfig(
            kv_budget_bytes=parse_size("64MiB"), min_prefix_len=defaults.MIN_PREFIX_LEN,
            max_levels=defaults.MAX_LEVELS, share=True))
        save_plan(plan, tmp / "job.plan")
        print(f"\nreal run: {len(plan.requests)} requests, builtin-tiny, CPU, 1 torch thread per engine")
        torch.set_num_threads(1)  # as each Ray CPU worker of 1 CPU runs
        start = time.perf_counter()
        single = run_plan_file(tmp / "job.plan", tmp / "single.jsonl", errors_path=None, model=None, device="cpu",
                               console=quiet)
        results = [("one engine, no Ray", single.wall_seconds, time.perf_counter() - start, single.output_tokens)]
        for workers in (1, 2):
            start = time.perf_counter()
            outcome = run_distributed(tmp / "job.plan", tmp / f"ray{workers}.jsonl", errors_path=None, model=None,
                                      device="cpu", workers=workers, ray_address=None, console=quiet,
                                      cpus_per_worker=1)
            results.append((f"Ray, {workers} worker(s)", outcome.wall_seconds, time.perf_counter() - start,
                            outcome.output_tokens))
    base = results[1][1]
    print("| system | generation s | process s (Ray start, model loads) | output tok/s | speedup over 1 worker |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, wall, total, tokens in results:
        print(f"| {name} | {wall:.2f} | {total:.2f} | {tokens / wall:,.0f} | {base / wall:.2f}x |")


if __name__ == "__main__":
    main()
