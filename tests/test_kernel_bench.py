"""benchmarks/kernel_bench.py --quick as a smoke test on CPU (Triton interpreter, tiny shapes): the planned
path, the torch cascade and SDPA all run, and agree."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="--quick on CUDA times real shapes: gpu_check.sh runs it")
def test_kernel_bench_quick_runs_on_cpu(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("kernel_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["sdpa_us"] is not None and rows[0]["torch_cascade_us"] is not None
    assert rows[0]["max_abs_diff"] < 1e-4
