"""What a person sees of a plan: the summary table, the JSON summary, and `plan --show`'s group listing."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from batchrun.plan import Plan, PlanHeader
from batchrun.sizes import human_bytes


def plan_summary_json(header: PlanHeader) -> dict[str, Any]:
    """The summary that `plan --json` prints: stable keys for scripts."""
    s = header.summary
    return {
        "requests": s.num_requests,
        "invalid": s.num_invalid,
        "groups": s.num_groups,
        "levels": s.num_levels,
        "shared_prefixes": s.num_shared_nodes,
        "prompt_tokens": s.prompt_tokens,
        "prefill_tokens": s.prefill_tokens,
        "saved_prefill_tokens": s.saved_prefill_tokens,
        "batches": s.num_batches,
        "kv_budget_bytes": header.params.kv_budget_bytes,
        "max_batch_kv_bytes": s.max_batch_kv_bytes,
        "model": header.model_name,
        "input": header.input_path,
    }


def render_plan_summary(console: Console, header: PlanHeader, *, title: str) -> None:
    s = plan_summary_json(header)
    saved_share = s["saved_prefill_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("requests", f"{s['requests']:,}"),
        ("invalid lines", f"{s['invalid']:,}"),
        ("groups", f"{s['groups']:,}"),
        ("shared prefixes", f"{s['shared_prefixes']:,} in {s['levels']} level(s)"),
        ("prompt tokens", f"{s['prompt_tokens']:,}"),
        ("tokens to prefill", f"{s['prefill_tokens']:,}"),
        ("tokens saved by sharing", f"{s['saved_prefill_tokens']:,} ({saved_share:.1%})"),
        ("KV budget", human_bytes(s["kv_budget_bytes"])),
        ("largest batch KV", human_bytes(s["max_batch_kv_bytes"])),
        ("batches", f"{s['batches']:,}"),
        ("model", s["model"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def render_plan_groups(console: Console, plan: Plan, tokenizer: Any, *, limit: int) -> None:
    """The first `limit` groups in execution order: size, prefix chain, decode ratio, a preview of the prefix."""
    layout, lengths = plan.layout, plan.tokens.lengths
    max_tokens = plan.max_tokens
    table = Table(title=f"groups in execution order (first {limit} of {len(layout.group_indptr) - 1})",
                  title_justify="left")
    for col in ("#", "requests", "shared prefix tokens by level", "decode ratio", "first ids", "prefix starts"):
        table.add_column(col, overflow="fold")
    for g in range(min(limit, len(layout.group_indptr) - 1)):
        members = np.asarray(layout.order[layout.group_indptr[g] : layout.group_indptr[g + 1]])
        first = int(members[0])
        chain = layout.forest.request_chain(first)
        levels = " → ".join(str(n) for n in layout.forest.segment_len[chain].tolist()) or "none"
        forest = layout.forest  # the planner's key: decode tokens over the prefill computed (shared once)
        prefill = (forest.segment_len[forest.read_nodes(members)].sum()
                   + (lengths[members] - forest.own_start[members]).sum())
        ratio = max_tokens[members].sum() / max(1, prefill)
        preview = ""
        if chain:
            top = plan.tokens[int(layout.node_request[chain[0]])][: min(24, int(layout.node_len[chain[0]]))]
            preview = tokenizer.decode(top.tolist()).replace("\n", "⏎")
        ids = ", ".join(plan.requests[int(i)].id for i in members[:3]) + (" …" if len(members) > 3 else "")
        table.add_row(str(g), str(len(members)), levels, f"{ratio:.3f}", ids, preview)
    console.print(table)


