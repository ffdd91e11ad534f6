"""batchrun: offline batch LLM inference over JSONL files, planned globally for prefix sharing."""

__version__ = "0.1.0"
