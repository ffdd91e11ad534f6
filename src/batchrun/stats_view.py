"""What a person sees of a run's report: the summary, over-time and workers tables, the side-by-side
comparison of several runs, and the PNG plot. matplotlib is imported only when plotting.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from batchrun.errors import UserError
from batchrun.sizes import human_bytes
from batchrun.stats import Report, Steps, report_json

_NUM_WINDOWS = 10  # rows of the "over time" table
_NUM_PLOT_BINS = 60


def render_report(console: Console, reports: Report | Sequence[Report]) -> None:
    """One report: its summary and its course over time. Several: side by side, with ratios to the first."""
    if isinstance(reports, Report):
        reports = [reports]
    if len(reports) == 1:
        console.print(_summary_table(reports[0]))
        if len(reports[0].steps):
            console.print(_over_time_table(reports[0]))
        if reports[0].workers:
            console.print(_workers_table(reports[0]))
    else:
        console.print(_comparison_table(reports))


# (label, report_json key, format) of the report tables
_ROWS: tuple[tuple[str, str, str], ...] = (
    ("requests", "requests", "{:,}"),
    ("failed", "failed", "{:,}"),
    ("prompt tokens", "prompt_tokens", "{:,}"),
    ("computed prompt tokens", "computed_prompt_tokens", "{:,}"),
    ("saved by sharing", "saved_prompt_share", "{:.1%}"),
    ("output tokens", "output_tokens", "{:,}"),
    ("wall seconds", "wall_seconds", "{:.2f}"),
    ("  prefill seconds", "prefill_seconds", "{:.2f}"),
    ("  decode seconds", "decode_seconds", "{:.2f}"),
    ("  other seconds", "other_seconds", "{:.2f}"),
    ("output tokens/s", "output_tokens_per_s", "{:,.1f}"),
    ("total tokens/s", "tokens_per_s", "{:,.1f}"),
    ("peak KV", "peak_kv_bytes", "bytes"),
    ("mean KV in use", "mean_kv_bytes", "bytes"),
    ("preemptions", "num_preemptions", "{:,}"),
    ("mean batch size", "mean_batch_size", "{:.1f}"),
    ("mean tokens/step", "mean_tokens_per_step", "{:.1f}"),
    ("steps", "num_steps", "{:,}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return human_bytes(value) if fmt == "bytes" else fmt.format(value)


def _summary_table(report: Report) -> Table:
    data = report_json(report)
    table = Table(title=f"batchrun stats: {report.name}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, fmt in _ROWS:
        table.add_row(label, _fmt(data[key], fmt))
    if data["kv_budget_bytes"]:
        table.add_row("KV budget", f"{human_bytes(data['kv_budget_bytes'])} (peak {data['peak_kv_share']:.0%}, "
                                   f"mean {data['mean_kv_share']:.0%})")
    if data["num_killed_segments"] or data["num_segments"] > 1:
        table.add_row("run segments", f"{data['num_segments']} ({data['num_killed_segments']} killed)")
    return table


def _over_time_table(report: Report) -> Table:
    steps = report.steps
    # Up to nine columns: no vertical rules, and cells fold rather than end in "…" when a narrow console (a log
    # is 80 columns) squeezes them; headers are words that wrap ("tokens/step" was cut to "tokens/…").
    table = Table(title="over time", box=box.SIMPLE_HEAD, pad_edge=False)
    # KV in use as a share of the budget: a few characters, where "953.7 MiB" twice would crowd the rest out.
    budget = report.kv_budget_bytes
    kv_unit = "%" if budget else "MiB"
    has_preemptions = bool(steps.num_preempted.any())  # a column only when there is something to show
    for name in ("from s", "steps", "mean batch", "tokens per step", "prefill tok", "output tok/s",
                 f"KV mean {kv_unit}", f"KV peak {kv_unit}", *(["preempted"] if has_preemptions else [])):
        min_width = 8 if name == "tokens per step" else None  # "per step" on one line
        table.add_column(name, justify="right", overflow="fold", min_width=min_width)
    edges = np.linspace(0.0, float(steps.t[-1]), _NUM_WINDOWS + 1)
    tf = "{:.1f}" if edges[-1] >= 10 else "{:.2f}"
    which = np.clip(np.searchsorted(edges, steps.t, side="left") - 1, 0, _NUM_WINDOWS - 1)
    for w in range(_NUM_WINDOWS):
        sel = which == w
        if not sel.any():
            continue
        span = max(edges[w + 1] - edges[w], 1e-9)
        tokens = steps.num_decode_tokens[sel] + steps.num_prefill_tokens[sel]
        table.add_row(
            tf.format(edges[w]), f"{int(sel.sum()):,}",
            f"{steps.num_running[sel].mean():.1f}", f"{tokens.mean():,.0f}",
            f"{int(steps.num_prefill_tokens[sel].sum()):,}",
            f"{steps.num_decode_tokens[sel].sum() / span:,.1f}", _kv(float(steps.kv_bytes[sel].mean()), budget),
            _kv(float(steps.kv_bytes[sel].max()), budget),
            *([f"{int(steps.num_preempted[sel].sum()):,}"] if has_preemptions else []),
        )
    return table


def _kv(num_bytes: float, budget: int | None) -> str:
    return f"{100 * num_bytes / budget:.1f}" if budget else f"{num_bytes / 2**20:,.1f}"


def _workers_table(report: Report) -> Table:
    table = Table(title="workers (distributed runs)")
    for name in ("run", "worker", "node", "device", "units", "requests", "busy s", "output tok/s", "lost"):
        table.add_column(name, justify="left" if name in ("node", "device") else "right")
    for w in report.workers:
        table.add_row(str(w["segment"]), str(w["worker"]), w["node"], w["device"], f"{int(w['units']):,}",
                      f"{int(w['requests']):,}", f"{w['busy_seconds']:.2f}", f"{w['output_tokens_per_s']:,.1f}",
                      "yes" if w["is_lost"] else "")
    return table


def _comparison_table(reports: Sequence[Report]) -> Table:
    data = [report_json(r) for r in reports]
    table = Table(title="batchrun stats (ratios against the first)")
    table.add_column("metric")
    for r in reports:
        table.add_column(r.name, justify="right")
    for label, key, fmt in _ROWS:
        base = data[0][key]
        cells = [_fmt(data[0][key], fmt)]
        for d in data[1:]:
            ratio = f" ({d[key] / base:.2f}x)" if d[key] is not None and base else ""
            cells.append(_fmt(d[key], fmt) + ("" if key == "saved_prompt_share" else ratio))
        table.add_row(label, *cells)
    return table


# --- plot ----------------------------------------------------------------------------------------------------


def plot_report(reports: Report | Sequence[Report], path: str | os.PathLike[str]) -> Path:
    """A PNG: output tokens/s, batch size and KV in use over the run (preemptions marked), and each run's
    prefill/decode/other time."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'batchrun[plot]'") from None
    if isinstance(reports, Report):
        reports = [reports]
    # Figure + the Agg canvas directly: no pyplot, so no global backend or figure state is touched.
    fig = Figure(figsize=(10, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_tput, ax_batch, ax_kv, ax_split = fig.subplots(4, 1)
    for r in reports:
        steps = r.steps
        if len(steps):
            centers, rate = _binned_rate(steps)
            ax_tput.plot(centers, rate, label=r.name)
            ax_batch.step(steps.t, steps.num_running, where="post", label=r.name)
            _plot_kv(ax_kv, r)
    ax_tput.set(title="output tokens/s", xlabel="seconds", ylabel="tokens/s")
    ax_batch.set(title="batch size (running requests)", xlabel="seconds", ylabel="requests")
    ax_kv.set(title="KV in use (dashed: the budget; x: preemptions)", xlabel="seconds", ylabel="MiB")
    names = [r.name for r in reports]
    split = np.array([[report_json(r)[k] for k in ("prefill_seconds", "decode_seconds", "other_seconds")]
                      for r in reports])
    left = np.zeros(len(reports))
    for i, (label, color) in enumerate((("prefill", "tab:orange"), ("decode", "tab:blue"), ("other", "0.7"))):
        ax_split.barh(names, split[:, i], left=left, label=label, color=color)
        left += split[:, i]
    ax_split.set(title="wall time split", xlabel="seconds")
    for ax in (ax_tput, ax_batch, ax_kv, ax_split):
        ax.legend(loc="best", fontsize="small")
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _plot_kv(ax: Any, report: Report) -> None:
    steps, mib = report.steps, float(1 << 20)
    (line,) = ax.step(steps.t, steps.kv_bytes / mib, where="post", label=report.name)
    if report.kv_budget_bytes:
        ax.axhline(report.kv_budget_bytes / mib, color=line.get_color(), linestyle="--", linewidth=0.8)
    is_preempting = steps.num_preempted > 0
    if is_preempting.any():
        ax.plot(steps.t[is_preempting], steps.kv_bytes[is_preempting] / mib, "x", color=line.get_color())


def _binned_rate(steps: Steps) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens per second in equal time bins (per-step rates are too noisy to read)."""
    end = max(float(steps.t[-1]), 1e-9)
    edges = np.linspace(0.0, end, min(_NUM_PLOT_BINS, len(steps)) + 1)
    tokens, _ = np.histogram(steps.t, bins=edges, weights=steps.num_decode_tokens)
    return (edges[:-1] + edges[1:]) / 2, tokens / np.diff(edges)
