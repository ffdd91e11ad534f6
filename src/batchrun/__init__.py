"""batchrun: offline batch LLM inference over JSONL files, planned globally for prefix sharing.

The library API (`generate`, `make_plan`, `run_job`, `job_stats`, ...) lives in `batchrun.api` and is
re-exported here on first use, so that `import batchrun` loads neither torch nor the planner.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["MadePlan", "Result", "generate", "job_stats", "make_plan", "planner_config", "run_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batchrun import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
