"""batchrun: offline batch LLM inference over JSONL files, planned globally for prefix sharing.

The library API (`generate`, `make_plan`, `run_job`, `job_stats`, ...) lives in `batchrun.api` and is
re-exported here on first use, so that `import batchrun` loads neither torch nor the planner.
"""

from __future__ import annotations

import os
from typing import Any

# How OpenMP threads wait for the next parallel region (a step runs ~10 per layer). libgomp's default spins
# 300,000 times (about a millisecond) before sleeping: when the machine runs more threads than it has cores, the
# spinning thread holds a core the working one needs, once per region (measured on a shared 2-core machine at
# load 6: a bf16 run 71 s spinning, 22 s with OMP_WAIT_POLICY=PASSIVE). Sleeping at once pays a wake-up per
# region instead (a bf16 run 10% slower than a short spin on a quiet machine). A short spin, 20,000, measured
# with the same workload: as fast as sleeping at loads 4 and 6, 10% faster at load 2. Set before torch loads
# OpenMP (here: before any batchrun module imports torch); a user's own setting of either variable wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

__version__ = "0.1.0"
__all__ = ["MadePlan", "Result", "generate", "job_stats", "make_plan", "planner_config", "run_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batchrun import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
