"""Every user-facing default, written once; the CLI options and the config dataclasses read them from here."""

from __future__ import annotations

BUILTIN_MODEL = "builtin-tiny"
# Sampling, when a request does not say (max_tokens as OpenAI's completions endpoint and vLLM).
MAX_TOKENS = 16
TEMPERATURE = 1.0
TOP_P = 1.0
TOP_K = 0  # 0: no top-k cut
# Planning.
KV_BUDGET = "4GiB"
MIN_PREFIX_LEN = 16  # a shared level shorter than this costs more (an extra attention part) than it saves
MAX_LEVELS = 4  # deepest chain of shared prefixes a request reads
# Running.
DEVICE = "auto"
PROGRESS_INTERVAL_S = 5.0  # plain progress lines when stdout is not a terminal
# Tokens one engine step computes: every decode token, then prefill chunks up to this (larger chunks keep the
# matrix products efficient; smaller ones let decode steps come sooner).
MAX_STEP_TOKENS = 2048
RUN_SEED = 0  # the run-level sampling stream of requests that give no seed
