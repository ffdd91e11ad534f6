"""Qwen3, Gemma 3 text and Mistral with a sliding window through the whole engine (plan with multi-level shared
prefixes → scheduler → cascade attention → sampler) against transformers' fp32 `generate`, token for token, as
test_engine.py's oracle does for the Llama family; and the context capped at the window when planning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchrun.model.spec import resolve_model
from batchrun.planner import PlannerConfig
from batchrun.planning import build_plan as plan_input
from batchrun.tokenizer import load_tokenizer
from checkpoints import WINDOW, make_checkpoint
from test_engine import assert_matches_transformers, build_plan, checkpoints, make_job, run  # noqa: F401

NEW_ARCHS = ("qwen3", "gemma3", "mistral-window")


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_greedy_with_shared_prefixes_matches_transformers(checkpoints, arch):  # noqa: F811
    ck = checkpoints(arch)
    for seed, with_eos in ((0, False), (1, True)):
        job = make_job(ck, seed, with_eos=with_eos)
        assert max(len(p) + q.max_tokens for p, q in zip(job.prompts, job.params, strict=True)) <= WINDOW
        plan = build_plan(job, kv_bytes_per_token=ck.model.config.kv_bytes_per_token)
        assert plan.layout.num_levels >= 2 and plan.layout.saved_prefill_tokens > 0
        writer, summary = run(ck, plan, job, kv_budget_bytes=1 << 30)
        assert_matches_transformers(ck, job, writer)
        assert summary.num_completed == len(job.prompts)


@pytest.mark.parametrize("arch", ["gemma3", "mistral-window"])
def test_requests_longer_than_the_window_become_error_lines(tmp_path: Path, arch: str) -> None:
    spec = resolve_model(str(make_checkpoint(tmp_path, arch)))
    lines = [{"id": "fits", "prompt": "a b c", "max_tokens": 8},
             {"id": "long", "prompt": "word " * WINDOW, "max_tokens": 8}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = PlannerConfig(kv_budget_bytes=1 << 30, min_prefix_len=4, max_levels=2, share=True)
    plan = plan_input(path, spec, load_tokenizer(spec), config)
    assert [r.id for r in plan.requests] == ["fits"]
    (invalid,) = plan.invalid
    assert invalid.code == "context_length_exceeded"
    assert f"the model's sliding window (batchrun caps the context at the window) of {WINDOW} tokens" in invalid.message
