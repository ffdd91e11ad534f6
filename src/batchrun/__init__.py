"""batchrun: offline batch LLM inference over JSONL files, planned globally for prefix sharing.

The library API (`generate`, `make_plan`, `run_job`, `job_stats`, ...) lives in `batchrun.api` and is
re-exported here on first use, so that `import batchrun` loads neither torch nor the planner.
"""

from __future__ import annotations

import os
from typing import Any

# OpenMP threads that spin while they wait (libgomp's default) lose whole time slices when the machine runs more
# threads than it has cores, once per parallel region; sleeping waits cost microseconds instead. Measured on a
# shared 2-core machine at load 6: a bf16 run 71 s spinning, 22 s passive. It must be set before torch loads
# OpenMP (here: before any batchrun module imports torch); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["MadePlan", "Result", "generate", "job_stats", "make_plan", "planner_config", "run_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batchrun import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
