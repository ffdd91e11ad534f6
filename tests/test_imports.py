"""Layering: planning, plan viewing, the report and the distributed driver import no torch (a subprocess
checks sys.modules, also after running `stats` and `plan --show --json`); the torch-free dtype table agrees
with torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchrun.dtypes import DTYPE_BYTES, dtype_name
from batchrun.model.spec import resolve_model
from batchrun.planfile import save_plan
from batchrun.planner import PlannerConfig
from batchrun.planning import build_plan
from batchrun.tokenizer import load_tokenizer

SAMPLE = Path(__file__).parent.parent / "sample_data"
TORCH_FREE = ("batchrun.planning", "batchrun.plan", "batchrun.planfile", "batchrun.plan_checks",
              "batchrun.plan_view", "batchrun.stats", "batchrun.stats_view", "batchrun.cli",
              "batchrun.distributed.dispatch", "batchrun.distributed.driver", "batchrun.distributed.messages")


def run_without_torch(code: str) -> None:
    """Runs `code` in a fresh interpreter, then fails if anything it did imported torch."""
    check = f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_planning_and_reporting_modules_import_no_torch() -> None:
    run_without_torch("".join(f"import {name}\n" for name in TORCH_FREE))


def test_stats_and_plan_show_of_a_plan_run_without_torch(tmp_path: Path) -> None:
    spec = resolve_model("builtin-tiny")
    config = PlannerConfig(kv_budget_bytes=1 << 30, min_prefix_len=16, max_levels=4, share=True)
    plan_path = tmp_path / "p.plan"
    save_plan(build_plan(SAMPLE / "requests.jsonl", spec, load_tokenizer(spec), config), plan_path)
    run_without_torch(f"from batchrun.cli import app\n"
                      f"app(['stats', {str(plan_path)!r}, '--json'], standalone_mode=False)\n"
                      f"app(['plan', '--show', {str(plan_path)!r}, '--json'], standalone_mode=False)")


def test_dtype_table_agrees_with_torch() -> None:
    for name, size in DTYPE_BYTES.items():
        assert getattr(torch, name).itemsize == size, name
    assert dtype_name("torch.bfloat16") == "bfloat16" and dtype_name("fp16") == "float16"
    with pytest.raises(ValueError, match="not supported"):
        dtype_name("int8")
