"""What `batchrun run` checks before it loads a model: that the plan's input file and model are still those it
was made for, and that the output it resumes was written from this plan."""

from __future__ import annotations

import os
from pathlib import Path

from batchrun.errors import UserError
from batchrun.metrics import metrics_path_for
from batchrun.model.spec import ModelSpec
from batchrun.plan import PlanHeader
from batchrun.stats import load_segments
from batchrun.tokens import TokenTable


def check_plan(header: PlanHeader, *, input_fingerprint: str | None, model: ModelSpec) -> None:
    """Refuses (UserError) a plan whose input file or model has changed since it was made."""
    if input_fingerprint is not None and input_fingerprint != header.input_fingerprint:
        raise UserError(f"the input file {header.input_path} has changed since the plan was made; "
                        "make the plan again with `batchrun plan`")
    if model.fingerprint != header.model_fingerprint:
        raise UserError(f"model {model.name!r} is not the model the plan was made for ({header.model_name!r}, "
                        f"fingerprint {header.model_fingerprint}, this one {model.fingerprint}); "
                        "use that model or make the plan again")


def check_plan_tokens(tokens: TokenTable, *, model: ModelSpec) -> None:
    """Refuses a plan holding a token id outside the model's embedding (planning makes none: damaged)."""
    if len(tokens.tokens) and (int(tokens.tokens.min()) < 0 or int(tokens.tokens.max()) >= model.config.vocab_size):
        raise UserError(f"the plan holds token ids outside model {model.name!r}'s vocabulary of "
                        f"{model.config.vocab_size}: the plan file is damaged (make it again with batchrun plan)")


def check_same_plan(output_path: str | os.PathLike[str], plan_fingerprint: str) -> str | None:
    """Proves that an output with bytes in it was written from this plan, before anything touches it: its
    metrics file must record this plan in every segment (resume matches records by id and line, which only
    holds for the same plan). Returns the errors file the last run recorded, or None."""
    output_path = Path(output_path)
    metrics_path = metrics_path_for(output_path)
    has_lines = output_path.is_file() and output_path.stat().st_size > 0
    if not metrics_path.is_file():
        if has_lines:
            raise UserError(f"{output_path} is not empty and has no {metrics_path.name} beside it to prove that "
                            "batchrun wrote it from this plan: choose another output file (batchrun never "
                            "changes a file it did not write)")
        return None
    segments = load_segments(metrics_path)
    for seg in segments:
        earlier = seg.run_info.get("plan_fingerprint")
        if earlier != plan_fingerprint:
            raise UserError(
                f"{output_path} was written from another plan (fingerprint {earlier}, this plan "
                f"{plan_fingerprint}): choose another output file or remove it and its {metrics_path.name}"
            )
    recorded = segments[-1].run_info.get("errors_path")
    return recorded if isinstance(recorded, str) else None
