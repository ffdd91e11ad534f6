"""batchrun: offline batch LLM inference over JSONL files, planned globally for prefix sharing."""

import os

# OpenMP threads that spin while they wait (libgomp's default) lose whole time slices when the machine runs more
# threads than it has cores, once per parallel region; sleeping waits cost microseconds instead. Measured on a
# shared 2-core machine at load 6: a bf16 run 71 s spinning, 22 s passive. It must be set before torch loads
# OpenMP (here: before any batchrun module imports torch); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
