"""The throughput report: a run's output file and its metrics segments (metrics.py) read back and added up.

load_report and report_json are what `batchrun stats` calls (stats_view draws the tables and the plot).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from batchrun import openai_format
from batchrun.errors import UserError
from batchrun.jsonl import iter_jsonl
from batchrun.metrics import (
    METRICS_SUFFIX,
    STEP_FIELDS,
    SUMMARY_FIELDS,
    WORKER_FIELDS,
    metrics_path_for,
    output_path_for,
)
from batchrun.planfile import MAGIC as PLAN_MAGIC


@dataclass(frozen=True)
class Steps:
    """Per-step series; `t` is seconds from the start of the segment (or of the run, once concatenated)."""

    t: np.ndarray  # float64[S], at the end of each step
    seconds: np.ndarray  # float64[S]
    num_running: np.ndarray  # int64[S]
    num_decode_tokens: np.ndarray  # int64[S]
    num_prefill_tokens: np.ndarray  # int64[S]
    kv_bytes: np.ndarray  # int64[S]: KV memory in use after the step
    num_preempted: np.ndarray  # int64[S]: requests preempted to make room for the step

    @staticmethod
    def from_rows(rows: list[tuple[float, float, int, int, int, int, int]]) -> Steps:
        a = np.array(rows, dtype=np.float64).reshape(-1, len(STEP_FIELDS))
        ints = a[:, 2:].astype(np.int64)
        return Steps(a[:, 0], a[:, 1], ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3], ints[:, 4])

    @staticmethod
    def concat(parts: Sequence[Steps], offsets: Sequence[float]) -> Steps:
        if not parts:
            return Steps.from_rows([])
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
        t = np.concatenate([p.t + off for p, off in zip(parts, offsets, strict=True)])
        return Steps(t, cat("seconds"), cat("num_running"), cat("num_decode_tokens"),
                     cat("num_prefill_tokens"), cat("kv_bytes"), cat("num_preempted"))

    def __len__(self) -> int:
        return len(self.t)

    def split_seconds(self) -> tuple[float, float]:
        """(prefill, decode) seconds: each step's time is split in proportion to its prefill and decode
        tokens. The matrix products dominate a step and scale with its token count, so this is close for
        mixed steps; decode tokens also read their KV, so decode's share is slightly understated."""
        tokens = self.num_prefill_tokens + self.num_decode_tokens
        share = np.divide(self.num_prefill_tokens, tokens, out=np.zeros(len(self)), where=tokens > 0)
        busy = np.where(tokens > 0, self.seconds, 0.0)
        return float((busy * share).sum()), float((busy * (1 - share)).sum())


class SegmentTotals(NamedTuple):
    """A segment's "summary" record (metrics.SUMMARY_FIELDS), written when the run ended normally."""

    wall_seconds: float
    prompt_tokens: int
    computed_prompt_tokens: int
    output_tokens: int
    peak_kv_bytes: int
    num_preemptions: int


@dataclass(frozen=True)
class Segment:
    """One `batchrun run` invocation. Without a summary (killed), wall time is its last step's `t`, computed
    prompt tokens the sum of its prefill tokens and output tokens the sum of its decode tokens (a lower
    bound: each request's first token is sampled from its prefill step)."""

    run_info: dict[str, Any]
    steps: Steps
    summary: SegmentTotals | None
    workers: tuple[dict[str, Any], ...] = ()  # a distributed run's per-worker records

    @property
    def is_killed(self) -> bool:
        return self.summary is None

    @property
    def wall_seconds(self) -> float:
        if self.summary is not None:
            return float(self.summary.wall_seconds)
        return float(self.steps.t[-1]) if len(self.steps) else 0.0

    @property
    def computed_prompt_tokens(self) -> int:
        if self.summary is not None:
            return int(self.summary.computed_prompt_tokens)
        return int(self.steps.num_prefill_tokens.sum())

    @property
    def output_tokens(self) -> int:
        if self.summary is not None:
            return int(self.summary.output_tokens)
        return int(self.steps.num_decode_tokens.sum())

    @property
    def peak_kv_bytes(self) -> int:
        peak = int(self.steps.kv_bytes.max()) if len(self.steps) else 0
        return max(peak, int(self.summary.peak_kv_bytes)) if self.summary is not None else peak

    @property
    def num_preemptions(self) -> int:
        if self.summary is not None:
            return int(self.summary.num_preemptions)
        return int(self.steps.num_preempted.sum())


@dataclass(frozen=True)
class Report:
    """A run's numbers: requests and their tokens from the output (each request once, whatever the number
    of segments), time and computed tokens from every metrics segment (killed ones included)."""

    name: str
    output_path: Path
    metrics_path: Path
    requests: int  # success lines
    failed: int  # error lines (output and errors file)
    prompt_tokens: int  # of the successful requests
    output_tokens: int  # of the successful requests
    segments: tuple[Segment, ...]
    steps: Steps = field(repr=False)  # all segments', `t` from the start of the first

    @property
    def computed_prompt_tokens(self) -> int:
        return sum(s.computed_prompt_tokens for s in self.segments)

    @property
    def wall_seconds(self) -> float:
        return sum(s.wall_seconds for s in self.segments)

    @property
    def saved_prompt_share(self) -> float:
        """Share of the prompt tokens that sharing did not compute (negative when killed work was redone)."""
        return 1 - self.computed_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        wall = self.wall_seconds
        return (self.prompt_tokens + self.output_tokens) / wall if wall > 0 else 0.0

    @property
    def peak_kv_bytes(self) -> int:
        return max((s.peak_kv_bytes for s in self.segments), default=0)

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.segments)

    @property
    def mean_kv_bytes(self) -> float:
        """KV in use, averaged over time (each step weighted by its seconds): how full the pool was kept."""
        steps = self.steps
        total = float(steps.seconds.sum())
        return float((steps.kv_bytes * steps.seconds).sum() / total) if total > 0 else 0.0

    @property
    def kv_budget_bytes(self) -> int | None:
        budget = self.segments[-1].run_info.get("kv_budget_bytes") if self.segments else None
        return int(budget) if budget is not None else None

    @property
    def num_killed_segments(self) -> int:
        return sum(s.is_killed for s in self.segments)

    @property
    def workers(self) -> list[dict[str, Any]]:
        """Per-worker records of the distributed segments, each with its segment's index and its output
        tokens per busy second."""
        return [{"segment": i, **w, "output_tokens_per_s": w["output_tokens"] / w["busy_seconds"]
                 if w["busy_seconds"] > 0 else 0.0} for i, s in enumerate(self.segments) for w in s.workers]


def load_report(path: str | os.PathLike[str], *, errors_path: str | os.PathLike[str] | None = None,
                name: str | None = None) -> Report:
    """The report for an output file or its metrics file. The errors file is found from the run records
    (`errors_path` in run_info) unless given. Raises UserError for a missing or corrupt file."""
    path = Path(path)
    if str(path).endswith(METRICS_SUFFIX):
        metrics_path, output_path = path, output_path_for(path)
    else:
        metrics_path, output_path = metrics_path_for(path), path
    if not metrics_path.is_file():
        raise UserError(f"no metrics file {metrics_path} (`batchrun run` writes it beside its output)")
    if not output_path.is_file():
        raise UserError(f"no output file {output_path} beside the metrics file {metrics_path}")
    segments = load_segments(metrics_path)
    error_files = {Path(errors_path)} if errors_path is not None else {
        Path(p) for s in segments if (p := s.run_info.get("errors_path"))
    }
    requests, failed, prompt_tokens, output_tokens = _count_output(output_path)
    for ef in error_files:
        if ef.is_file() and ef.resolve() != output_path.resolve():
            failed += _count_output(ef)[1]
    offsets = np.cumsum([0.0] + [s.wall_seconds for s in segments[:-1]])
    return Report(
        name=name or output_path.name, output_path=output_path, metrics_path=metrics_path,
        requests=requests, failed=failed, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        segments=tuple(segments), steps=Steps.concat([s.steps for s in segments], list(offsets)),
    )


def load_segments(path: Path) -> list[Segment]:
    """The run segments of a metrics file, in file order; UserError naming the line when it is not one."""
    segments: list[Segment] = []
    run: dict[str, Any] | None = None
    rows: list[tuple[float, float, int, int, int, int, int]] = []
    summary: SegmentTotals | None = None
    workers: list[dict[str, Any]] = []

    def close_segment() -> None:
        if run is not None:
            # Workers' steps arrive in batches, not in time order: sorting by t is a no-op for one engine.
            segments.append(Segment(run_info=run, steps=Steps.from_rows(sorted(rows)), summary=summary,
                                    workers=tuple(workers)))

    for line_no, rec in iter_jsonl(path, allow_torn_tail=True):
        kind = rec.get("type")
        where = f"metrics file {path}:{line_no}"
        if kind == "run":
            close_segment()
            run = {k: v for k, v in rec.items() if k != "type"}
            rows, summary, workers = [], None, []
        elif kind in ("step", "summary", "worker"):
            if run is None:
                raise UserError(f"{where}: a {kind!r} record before any 'run' record")
            if summary is not None:
                raise UserError(f"{where}: a {kind!r} record after the segment's summary")
            if kind == "step":
                rows.append(tuple(_number(rec, k, where) for k in STEP_FIELDS))  # type: ignore[arg-type]
            elif kind == "worker":
                workers.append({"node": str(rec.get("node", "?")), "device": str(rec.get("device", "?")),
                                "is_lost": bool(rec.get("is_lost", False)),
                                **{k: _number(rec, k, where) for k in WORKER_FIELDS}})
            else:
                summary = SegmentTotals(**{k: _number(rec, k, where) for k in SUMMARY_FIELDS})
        else:
            raise UserError(f"{where}: unknown record type {kind!r} (expected run, step, worker or summary)")
    close_segment()
    if not segments:
        raise UserError(f"metrics file {path} has no 'run' record: it is empty or not a batchrun metrics file")
    return segments


# Fields that metrics files written before preemption existed lack: they read as 0.
_ADDED_FIELDS = {"num_preempted": 0, "num_preemptions": 0}


def _number(rec: dict[str, Any], key: str, where: str) -> float:
    value = rec.get(key, _ADDED_FIELDS.get(key))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: field {key!r} is {'missing' if value is None else 'not a number'}")
    return value


def _count_output(path: Path) -> tuple[int, int, int, int]:
    """(successes, errors, prompt tokens, completion tokens) of an output or errors file."""
    ok = failed = prompt = completion = 0
    for line_no, obj in iter_jsonl(path, allow_torn_tail=True):
        if (openai_format.error_of(obj) if "custom_id" in obj else obj.get("error")) is not None:
            failed += 1
            continue
        response = obj.get("response")
        usage = response.get("body", {}).get("usage") if isinstance(response, dict) else obj.get("usage")
        if not isinstance(usage, dict):
            raise UserError(f"{path}:{line_no}: a result line without 'usage': not a batchrun output file")
        ok += 1
        prompt += int(usage.get("prompt_tokens", 0))
        completion += int(usage.get("completion_tokens", 0))
    return ok, failed, prompt, completion


StatsKind = Literal["output", "metrics", "plan"]


def stats_target_kind(path: str | os.PathLike[str]) -> StatsKind:
    """What `batchrun stats PATH` was given: a plan (its magic bytes), a metrics file (its name), else an
    output file. "plan" is the hook for `batchrun stats PLAN`: the CLI hands it to plan_view's summary; this
    module does not read plans."""
    path = Path(path)
    if str(path).endswith(METRICS_SUFFIX):
        return "metrics"
    try:
        with open(path, "rb") as f:
            if f.read(len(PLAN_MAGIC)) == PLAN_MAGIC:
                return "plan"
    except OSError:
        pass  # missing or unreadable: load_report says so, naming the file
    return "output"


# --- report as JSON ------------------------------------------------------------------------------------------


def report_json(report: Report) -> dict[str, Any]:
    prefill_s, decode_s = report.steps.split_seconds()
    budget = report.kv_budget_bytes
    steps = report.steps
    return {
        "name": report.name,
        "output_path": str(report.output_path),
        "metrics_path": str(report.metrics_path),
        "requests": report.requests,
        "failed": report.failed,
        "prompt_tokens": report.prompt_tokens,
        "computed_prompt_tokens": report.computed_prompt_tokens,
        "saved_prompt_share": report.saved_prompt_share,
        "output_tokens": report.output_tokens,
        "wall_seconds": report.wall_seconds,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "other_seconds": max(0.0, report.wall_seconds - prefill_s - decode_s),
        "output_tokens_per_s": report.output_tokens_per_s,
        "tokens_per_s": report.tokens_per_s,
        "peak_kv_bytes": report.peak_kv_bytes,
        "kv_budget_bytes": budget,
        "peak_kv_share": report.peak_kv_bytes / budget if budget else None,
        "mean_kv_bytes": report.mean_kv_bytes,
        "mean_kv_share": report.mean_kv_bytes / budget if budget else None,
        "num_preemptions": report.num_preemptions,
        "num_segments": len(report.segments),
        "num_killed_segments": report.num_killed_segments,
        "num_steps": len(steps),
        "mean_batch_size": float(steps.num_running.mean()) if len(steps) else 0.0,
        "max_batch_size": int(steps.num_running.max()) if len(steps) else 0,
        "mean_tokens_per_step": (
            float((steps.num_decode_tokens + steps.num_prefill_tokens).mean()) if len(steps) else 0.0
        ),
        "workers": report.workers,
    }
