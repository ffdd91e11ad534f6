"""Every user-facing default, written once; the CLI options and the config dataclasses read them from here."""

from __future__ import annotations

BUILTIN_MODEL = "builtin-tiny"
# Sampling, when a request does not say (max_tokens as OpenAI's completions endpoint and vLLM).
MAX_TOKENS = 16
TEMPERATURE = 1.0
TOP_P = 1.0
TOP_K = 0  # 0: no top-k cut
# Planning: the KV memory one batch of the plan may hold (batch shaping; `run` sizes its own, see below).
KV_BUDGET = "4GiB"
MIN_PREFIX_LEN = 16  # a shared level shorter than this costs more (an extra attention part) than it saves
MAX_LEVELS = 4  # deepest chain of shared prefixes a request reads
# Running.
DEVICE = "auto"
PROGRESS_INTERVAL_S = 5.0  # plain progress lines when stdout is not a terminal
# Tokens one engine step computes: every decode token, then prefill chunks up to this (larger chunks keep the
# matrix products efficient; smaller ones let decode steps come sooner).
MAX_STEP_TOKENS = 2048
# The KV pool at run time: "auto" sizes it from the machine once the weights are loaded. On CUDA, this share of
# the device's memory (as vLLM's gpu_memory_utilization) minus what is already in use and the step's
# activations; on the CPU, this share of MemAvailable (the rest is left to the OS and other jobs).
RUN_KV_BUDGET = "auto"
CUDA_MEMORY_FRACTION = 0.9
CPU_MEMORY_SHARE = 0.5
# KV grows with the tokens produced: admission leaves this share of the pool free, plus this many decode steps
# of growth per running request, so that preemption stays rare (vLLM keeps a 1% watermark).
KV_WATERMARK = 0.01
KV_LOOKAHEAD_STEPS = 4
RUN_SEED = 0  # the run-level sampling stream of requests that give no seed
