"""Scheduler bookkeeping on random plans, driven by a fake engine: budget never exceeded, every request admitted
once, shared nodes prefilled once before their readers and freed exactly once, no idle step while work remains."""

from __future__ import annotations

import numpy as np
import pytest

from batchrun.engine.kv_cache import SlotAllocator
from batchrun.engine.scheduler import Scheduler, SchedulerConfig
from batchrun.forest import PrefixForest
from batchrun.kv_accounting import KVAccounting


def random_plan(rng: np.random.Generator, *, max_depth: int = 3):
    """A random prefix forest in the PlanLayout shape: nodes topologically ordered, members contiguous in order."""
    node_parent, node_len, request_node, prompt_len, max_tokens, order = [], [], [], [], [], []

    def add_request(node: int, start: int) -> None:
        request_node.append(node)
        prompt_len.append(start + int(rng.integers(1, 30)))
        max_tokens.append(int(rng.integers(1, 20)))
        order.append(len(request_node) - 1)

    def add_node(parent: int, start: int, depth: int) -> None:
        n = len(node_parent)
        node_parent.append(parent)
        node_len.append(start + int(rng.integers(1, 40)))
        for _ in range(int(rng.integers(1, 5))):
            if depth + 1 < max_depth and rng.random() < 0.3:
                add_node(n, node_len[n], depth + 1)
            else:
                add_request(n, node_len[n])

    for _ in range(int(rng.integers(1, 8))):
        if rng.random() < 0.3:
            add_request(-1, 0)
        else:
            add_node(-1, 0, 0)
    as_i32 = lambda a: np.asarray(a, np.int32)
    return dict(
        node_parent=as_i32(node_parent),
        node_len=as_i32(node_len),
        request_node=as_i32(request_node),
        order=as_i32(order),
        prompt_len=as_i32(prompt_len),
        max_tokens=as_i32(max_tokens),
    )


def make_scheduler(plan, *, is_skipped, config):
    """A scheduler over a plan dict (random_plan's keys)."""
    forest = PrefixForest.from_arrays(node_parent=plan["node_parent"], node_len=plan["node_len"],
                                      request_node=plan["request_node"])
    kv = KVAccounting(forest, prompt_len=plan["prompt_len"], max_tokens=plan["max_tokens"])
    return Scheduler(kv=kv, order=plan["order"], is_skipped=is_skipped, config=config)


def drive(plan, *, num_slots, max_step_tokens, is_skipped, rng, reserve=False, out_len=None, **config):
    """Runs the scheduler to the end with a fake engine, checking invariants at every step."""
    config = SchedulerConfig(num_slots, max_step_tokens, reserve_max_tokens=reserve, **config)
    sched = make_scheduler(plan, is_skipped=is_skipped, config=config)
    num_requests = len(plan["request_node"])
    # Each request stops after a random number of tokens (EOS) at most max_tokens.
    if out_len is None:
        out_len = np.array([int(rng.integers(1, m + 1)) for m in plan["max_tokens"]])
    generated = np.zeros(num_requests, int)
    prefilled = {}  # ("n"|"r", index) → next position to prefill
    prefill_end = {}  # ("n"|"r", index) → where its prefill ends
    resident, ever_resident, freed = set(), set(), set()
    running, finished, rejected, num_admissions = set(), set(), set(), np.zeros(num_requests, int)
    alloc = SlotAllocator(num_slots)
    held = {}
    computed = expected_computed = 0
    steps = 0
    while (step := sched.schedule()) is not None:
        steps += 1
        assert steps < 10_000, "no progress"
        for n in step.freed_nodes:
            # Freed under pressure only when no running request reads it; else with its last member.
            assert not any(n in sched.forest.request_chain(r) for r in running)
            resident.remove(n)
            freed.add(n)
            alloc.free(held.pop(("n", n)))
            expected_computed -= prefill_end["n", n] - prefilled["n", n]  # dropped mid-prefill
        for r in step.preempted:
            assert r in running and not reserve, "the old rule never preempts"
            running.remove(r)
            expected_computed -= prefill_end["r", r] - prefilled["r", r]
            alloc.free(held.pop(("r", r)))
        for n in step.admitted_nodes:
            assert n not in resident
            resident.add(n)
            ever_resident.add(n)
            prefilled["n", n] = int(sched.forest.node_start[n])
            prefill_end["n", n] = int(sched.forest.node_len[n])
            expected_computed += sched.node_tokens(n)
            held["n", n] = alloc.alloc(sched.node_tokens(n))
        for r in step.admitted:
            assert r not in running and r not in finished and r not in rejected and not is_skipped[r]
            assert all(n in resident for n in sched.forest.request_chain(r))
            running.add(r)
            num_admissions[r] += 1
            # A preempted request recomputes its own prompt and every token it had generated.
            own = int(sched.kv.prompt_len[r] - sched.forest.own_start[r]) + generated[r]
            assert sched.own_tokens(r) == own
            prefilled["r", r] = int(sched.forest.own_start[r])
            prefill_end["r", r] = int(sched.kv.prompt_len[r]) + generated[r]
            expected_computed += own
            held["r", r] = alloc.alloc(own)
        for r in step.rejected:
            rejected.add(r)
            need = sum(sched.node_tokens(n) for n in sched.forest.request_chain(r)) + int(
                sched.kv.own_prompt_tokens[r] + sched.kv.decode_tokens[r])
            assert need > num_slots, "rejected a request that fits an empty pool"
        # Decode rows grow their request's KV by one slot each.
        decode = step.decode.tolist()
        for r in decode:
            held["r", r] = np.r_[held["r", r], alloc.alloc(1)]
            assert len(held["r", r]) == sched.own_tokens(r)
        # Continuous admission: work waits only while something runs (and frees memory as it finishes).
        assert sched.num_running > 0 or sched._next_candidate() is None
        if reserve and sched.next_pos < num_requests and not sched.preempted:
            r = int(sched.order[sched.next_pos])
            cost = sum(sched.node_tokens(n) for n in sched.forest.request_chain(r) if not sched.is_resident[n])
            assert sched.num_committed + cost + int(sched.kv.request_tokens[r]) > num_slots
        # What the scheduler counts is exactly what is held, and never more than the pool.
        expected = sum(sched.node_tokens(n) for n in resident) + sum(sched.own_tokens(r) for r in running)
        assert sched.num_used == expected == alloc.num_used <= sched.num_committed <= num_slots
        assert running == set(np.flatnonzero(sched.is_running).tolist())
        # Step composition: decode rows in plan order, prefill chunks within the token budget.
        assert sorted(decode, key=lambda r: sched.plan_pos[r]) == decode and len(set(decode)) == len(decode)
        num_prefill = sum(c.end - c.start for c in step.chunks)
        assert len(decode) + num_prefill <= max(max_step_tokens, len(decode))
        for c in step.chunks:
            key = ("n" if c.is_node else "r", c.index)
            assert prefilled[key] == c.start < c.end, "chunks are contiguous, each token once"
            prefilled[key] = c.end
            assert c.is_last == (c.end == prefill_end[key])
            # What it reads is resident and already fully prefilled (earlier in this step or before).
            readers_chain = (sched.forest.node_chain(int(sched.forest.node_parent[c.index])) if c.is_node
                             else sched.forest.request_chain(c.index))
            for n in readers_chain:
                assert n in resident and prefilled["n", n] == sched.forest.node_len[n]
            computed += c.end - c.start
        for r in decode:
            assert r in running and prefilled["r", r] == prefill_end["r", r] and generated[r] >= 1
            assert all(n in resident for n in sched.forest.request_chain(r))
        # Fake sampling: one token per decode row and per completed request prefill.
        done_now = []
        for r in decode + [c.index for c in step.chunks if c.is_last and not c.is_node]:
            generated[r] += 1
            assert generated[r] <= plan["max_tokens"][r] and generated[r] == sched.num_generated[r]
            if generated[r] == out_len[r]:
                done_now.append(r)
        for r in done_now:
            alloc.free(held.pop(("r", r)))
            running.remove(r)
            finished.add(r)
            for n in sched.finish(r):
                assert n in resident
                # Never freed while a member is unfinished.
                assert not any(n in sched.forest.request_chain(m) for m in running)
                resident.remove(n)
                freed.add(n)
                alloc.free(held.pop(("n", n)))
    want = {r for r in range(num_requests) if not is_skipped[r]}
    assert finished | rejected == want and not finished & rejected and not running
    assert all(generated[r] == out_len[r] for r in finished)
    assert freed == ever_resident and not resident and sched.num_used == 0 and alloc.num_used == 0
    assert sched.num_preemptions == int(num_admissions.sum()) - len(finished)
    # Every admission's prefill computed once (shared segments as often as they were made resident), but for
    # what preemption cut short.
    assert computed == expected_computed
    if sched.num_preemptions == 0:
        own = sum(int(sched.kv.prompt_len[r] - sched.forest.own_start[r]) for r in finished)
        assert computed == own + sum(sched.node_tokens(n) for n in ever_resident)
    return sched, steps, finished, rejected


@pytest.mark.parametrize("reserve", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_random_plans_keep_invariants(seed, reserve):
    rng = np.random.default_rng(seed)
    plan = random_plan(rng)
    num_requests = len(plan["request_node"])
    is_skipped = rng.random(num_requests) < (0.3 if seed % 3 == 0 else 0.0)
    num_slots = int(rng.choice([40, 80, 200, 10_000]))
    drive(plan, num_slots=num_slots, max_step_tokens=int(rng.choice([1, 7, 64, 4096])), is_skipped=is_skipped,
          rng=rng, reserve=reserve)


def test_tiny_budgets_preempt_and_lose_nothing():
    # The pool barely holds the largest request alone and admission looks no step ahead: running requests
    # outgrow it all the time, so preemption (and freeing idle nodes) is the rule, not the exception.
    num_preempting = 0
    for seed in range(60):
        rng = np.random.default_rng(1000 + seed)
        plan = random_plan(rng)
        num_requests = len(plan["request_node"])
        need = plan["prompt_len"].astype(int) + plan["max_tokens"]
        num_slots = int(need.max()) + int(rng.integers(0, 10))
        sched, _, finished, rejected = drive(
            plan, num_slots=num_slots, max_step_tokens=int(rng.choice([3, 16, 4096])),
            is_skipped=rng.random(num_requests) < 0.2, rng=rng, watermark=0.0, lookahead_steps=0)
        assert not rejected
        num_preempting += sched.num_preemptions > 0
    assert num_preempting >= 30


def test_growth_admits_by_use_where_reservation_waits():
    # 8 requests of 4 prompt tokens, max_tokens 100, that stop after 5: reserving 104 each fits one in 120
    # slots at a time; growing, all 8 run together (32 prompt + 8 * 4 lookahead + 5 steps each fits).
    plan = dict(node_parent=np.zeros(0, np.int32), node_len=np.zeros(0, np.int32), request_node=np.full(8, -1),
                order=np.arange(8), prompt_len=np.full(8, 4), max_tokens=np.full(8, 100))
    steps = {}
    for reserve in (True, False):
        sched = make_scheduler(plan, is_skipped=np.zeros(8, bool),
                               config=SchedulerConfig(120, 64, watermark=0.0, reserve_max_tokens=reserve))
        step = sched.schedule()
        assert len(step.admitted) == (1 if reserve else 8)
        sched, steps[reserve], finished, _ = drive(
            plan, num_slots=120, max_step_tokens=64, reserve=reserve, is_skipped=np.zeros(8, bool),
            rng=np.random.default_rng(0), out_len=np.full(8, 5), watermark=0.0)
        assert len(finished) == 8 and sched.num_preemptions == 0
    assert steps == {True: 8 * 5, False: 5}


def test_preemption_takes_the_latest_request_that_does_not_hold_a_node_alone():
    # Requests 0, 1 read node 0; request 2 reads node 1 alone; request 3 reads nothing. Preemption passes over
    # the earliest request (0) and request 2 (node 1's only running reader), so it takes 3, then 1.
    plan = dict(node_parent=np.array([-1, -1]), node_len=np.array([4, 4]), request_node=np.array([0, 0, 1, -1]),
                order=np.arange(4), prompt_len=np.array([5, 5, 5, 1]), max_tokens=np.full(4, 8))
    sched = make_scheduler(plan, is_skipped=np.zeros(4, bool),
                           config=SchedulerConfig(24, 64, watermark=0.0, lookahead_steps=0))
    step = sched.schedule()  # 4 + 1 + 1 + 4 + 1 + 1 = 12 tokens: everyone fits
    assert step.admitted == [0, 1, 2, 3] and sched.num_used == 12
    victims = []
    while sched.num_preemptions < 2:
        victims += sched.schedule().preempted
    assert victims == [3, 1] and sched.is_running[[0, 2]].all()
    assert sched.is_resident.all(), "shared nodes stay resident while a member is unfinished"


def test_a_large_budget_admits_everything_at_once():
    rng = np.random.default_rng(0)
    plan = random_plan(rng)
    sched = make_scheduler(plan, is_skipped=np.zeros(len(plan["order"]), bool),
                      config=SchedulerConfig(100_000, 100_000))
    step = sched.schedule()
    assert sorted(step.admitted) == list(range(len(plan["order"])))
    assert step.chunks and all(c.is_last for c in step.chunks)
    assert [c.index for c in step.chunks if not c.is_node] == plan["order"].tolist()


def test_a_small_budget_runs_in_waves_and_frees_the_shared_node_last():
    # One node of 10 tokens, 4 members each needing 2 own + 3 output tokens: 10 + 2 * 5 fits two at a time.
    plan = dict(node_parent=np.array([-1]), node_len=np.array([10]), request_node=np.zeros(4, np.int32),
                order=np.arange(4), prompt_len=np.full(4, 12), max_tokens=np.full(4, 3))
    sched = make_scheduler(plan, is_skipped=np.zeros(4, bool), config=SchedulerConfig(20, 64, reserve_max_tokens=True))
    step = sched.schedule()
    assert step.admitted_nodes == [0] and step.admitted == [0, 1]
    assert [(c.is_node, c.index) for c in step.chunks] == [(True, 0), (False, 0), (False, 1)]
    assert sched.finish(0) == [] and sched.finish(1) == []
    step = sched.schedule()
    assert step.admitted_nodes == [] and step.admitted == [2, 3]  # the node stayed resident between waves
    assert sched.finish(2) == [] and sched.finish(3) == [0]
    assert sched.schedule() is None and sched.num_used == 0


def test_skipped_members_do_not_compute_their_node():
    plan = dict(node_parent=np.array([-1, -1]), node_len=np.array([10, 10]), request_node=np.array([0, 0, 1]),
                order=np.arange(3), prompt_len=np.full(3, 12), max_tokens=np.full(3, 3))
    sched = make_scheduler(plan, is_skipped=np.array([True, True, False]), config=SchedulerConfig(1000, 64))
    step = sched.schedule()
    assert step.admitted_nodes == [1] and step.admitted == [2]


def test_a_request_larger_than_the_budget_is_rejected_and_the_rest_runs():
    plan = dict(node_parent=np.zeros(0, np.int32), node_len=np.zeros(0, np.int32), request_node=np.full(3, -1),
                order=np.arange(3), prompt_len=np.array([5, 50, 5]), max_tokens=np.array([5, 5, 5]))
    sched, _, admitted, rejected = drive(plan, num_slots=20, max_step_tokens=8, is_skipped=np.zeros(3, bool),
                                         rng=np.random.default_rng(0))
    assert rejected == {1} and admitted == {0, 2}


def test_decode_tokens_come_first_and_prefill_fills_the_rest():
    plan = dict(node_parent=np.zeros(0, np.int32), node_len=np.zeros(0, np.int32), request_node=np.full(3, -1),
                order=np.arange(3), prompt_len=np.array([4, 4, 100]), max_tokens=np.array([9, 9, 9]))
    sched = make_scheduler(plan, is_skipped=np.zeros(3, bool), config=SchedulerConfig(1000, 10))
    step = sched.schedule()
    assert [(c.index, c.start, c.end) for c in step.chunks] == [(0, 0, 4), (1, 0, 4), (2, 0, 2)]
    step = sched.schedule()
    assert step.decode.tolist() == [0, 1] and [(c.index, c.start, c.end) for c in step.chunks] == [(2, 2, 10)]


def test_slot_allocator_hands_out_each_slot_once():
    alloc = SlotAllocator(10)
    a, b = alloc.alloc(4), alloc.alloc(6)
    assert sorted(np.r_[a, b].tolist()) == list(range(10)) and alloc.num_free == 0
    alloc.free(a)
    c = alloc.alloc(3)
    assert set(c.tolist()) <= set(a.tolist()) and alloc.num_used == 9
    alloc.free(b[:1])
    with pytest.raises(AssertionError, match="twice"):
        alloc.free(b[:1])
    with pytest.raises(AssertionError, match="twice"):
        alloc.free(np.r_[b[1], b[1]])
    with pytest.raises(AssertionError):
        alloc.alloc(3)


def test_reservation_agrees_with_the_planners_kv_accounting():
    from batchrun.planner import PlannerConfig, plan_requests
    from batchrun.tokens import TokenTable

    rng = np.random.default_rng(5)
    system = rng.integers(2, 50, 12).tolist()
    docs = [rng.integers(2, 50, int(rng.integers(5, 15))).tolist() for _ in range(5)]
    prompts = [system + docs[i % 5] + rng.integers(2, 50, int(rng.integers(1, 6))).tolist() for i in range(30)]
    prompts += [rng.integers(2, 50, int(rng.integers(2, 20))).tolist() for _ in range(5)]
    tokens = TokenTable.from_lists(prompts)
    max_tokens = rng.integers(1, 10, len(prompts))
    budget = 120
    layout = plan_requests(tokens, max_tokens, kv_bytes_per_token=1,
                           config=PlannerConfig(kv_budget_bytes=budget, min_prefix_len=3, max_levels=3, share=True))
    assert layout.num_levels >= 2
    kv = KVAccounting(layout.forest, prompt_len=tokens.lengths, max_tokens=max_tokens)
    check_reservation(layout, kv, budget=budget, max_step_tokens=16, out_len=max_tokens)


def check_reservation(layout, kv, *, budget, max_step_tokens, out_len):
    """On planner-made layouts, what the scheduler holds is planner.kv_tokens of the running requests, plus
    the shared nodes kept resident between waves for members not yet admitted (each request stops after
    out_len tokens)."""
    from batchrun.planner import kv_tokens

    num_requests = len(layout.order)
    sched = Scheduler(kv=kv, order=layout.order, is_skipped=np.zeros(num_requests, bool),
                      config=SchedulerConfig(budget, max_step_tokens, reserve_max_tokens=True))
    seg = layout.forest.segment_len
    running: set[int] = set()
    generated = np.zeros(num_requests, int)
    while (step := sched.schedule()) is not None:
        running |= set(step.admitted)
        read = {n for r in running for n in sched.forest.request_chain(r)}
        lingering = sum(int(seg[n]) for n in np.flatnonzero(sched.is_resident) if n not in read)
        held = kv_tokens(layout, prompt_len=kv.prompt_len, max_tokens=kv.decode_tokens,
                         requests=np.array(sorted(running)))
        assert sched.num_committed == held + lingering <= budget
        for r in step.decode.tolist() + [c.index for c in step.chunks if c.is_last and not c.is_node]:
            generated[r] += 1
            if generated[r] == out_len[r]:
                sched.finish(r)
                running.discard(r)
    assert not running and sched.num_used == 0
