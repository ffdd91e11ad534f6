"""Metrics file and report: numbers from synthetic files checked by hand, killed and resumed runs, corrupt
files, the tables and the plot."""

from __future__ import annotations

import io
import sys

import orjson
import pytest
from rich.console import Console

from batchrun import metrics
from batchrun.errors import UserError
from batchrun.metrics import MetricsRecorder, metrics_path_for
from batchrun.plan_checks import check_same_plan
from batchrun.planfile import MAGIC as PLAN_MAGIC
from batchrun.stats import load_report, report_json, stats_target_kind
from batchrun.stats_view import plot_report, render_report


def step(t, seconds, running, decode, prefill, kv):
    return {"type": "step", "t": t, "seconds": seconds, "num_running": running, "num_decode_tokens": decode,
            "num_prefill_tokens": prefill, "kv_bytes": kv}


def run(**info):
    return {"type": "run", "time": 1.7e9, **info}


SUMMARY_A = {"type": "summary", "time": 1.7e9, "wall_seconds": 2.5, "prompt_tokens": 400,
             "computed_prompt_tokens": 303, "output_tokens": 6, "peak_kv_bytes": 450}
SEGMENT_A = [  # complete: prefill, decode, then a mixed step
    run(kv_budget_bytes=1000, plan_fingerprint="abc"),
    step(1.0, 1.0, 2, 0, 300, 400),
    step(1.5, 0.5, 2, 2, 0, 420),
    step(2.0, 0.4, 2, 1, 3, 430),  # 0.4 s split 3:1 → 0.3 prefill, 0.1 decode
    SUMMARY_A,
]
SEGMENT_KILLED = [  # no summary: numbers from the steps
    run(kv_budget_bytes=2000),
    step(0.5, 0.5, 4, 0, 100, 100),
    step(1.2, 0.6, 4, 4, 0, 200),
]


def write_jsonl(path, records) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))


def plain_ok(rid, prompt, completion):
    return {"id": rid, "text": "", "token_ids": [0] * completion, "finish_reason": "length",
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


@pytest.fixture
def out_a(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [plain_ok("a", 200, 3), plain_ok("b", 200, 3),
                      {"id": None, "line": 3, "error": {"code": "invalid_json", "message": "x"}}])
    write_jsonl(metrics_path_for(out), SEGMENT_A)
    return out


def test_report_numbers_by_hand(out_a):
    j = report_json(load_report(out_a))
    assert j["requests"] == 2 and j["failed"] == 1
    assert j["prompt_tokens"] == 400 and j["computed_prompt_tokens"] == 303 and j["output_tokens"] == 6
    assert j["saved_prompt_share"] == pytest.approx(1 - 303 / 400)
    assert j["wall_seconds"] == 2.5
    assert j["prefill_seconds"] == pytest.approx(1.3) and j["decode_seconds"] == pytest.approx(0.6)
    assert j["other_seconds"] == pytest.approx(0.6)
    assert j["output_tokens_per_s"] == pytest.approx(6 / 2.5)
    assert j["tokens_per_s"] == pytest.approx(406 / 2.5)
    assert j["peak_kv_bytes"] == 450 and j["kv_budget_bytes"] == 1000 and j["peak_kv_share"] == 0.45
    assert j["num_steps"] == 3 and j["mean_batch_size"] == 2 and j["mean_tokens_per_step"] == 102
    assert j["num_segments"] == 1 and j["num_killed_segments"] == 0
    assert report_json(load_report(metrics_path_for(out_a))) == j  # the metrics file names the same run


def test_preemptions_and_kv_use_over_time(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [plain_ok("a", 10, 2)])
    steps = [{**step(1.0, 1.0, 3, 0, 30, 600), "num_preempted": 0},
             {**step(2.0, 1.0, 2, 2, 0, 900), "num_preempted": 1},
             {**step(4.0, 2.0, 2, 2, 0, 300), "num_preempted": 2}]
    write_jsonl(metrics_path_for(out), [run(kv_budget_bytes=1000), *steps])  # killed: counted from the steps
    report = load_report(out)
    j = report_json(report)
    assert j["num_preemptions"] == 3 and j["peak_kv_bytes"] == 900
    assert j["mean_kv_bytes"] == pytest.approx((600 + 900 + 2 * 300) / 4) and j["mean_kv_share"] == pytest.approx(0.525)
    write_jsonl(metrics_path_for(out), [run(kv_budget_bytes=1000), *steps, {**SUMMARY_A, "num_preemptions": 5}])
    assert report_json(load_report(out))["num_preemptions"] == 5  # the summary's count, when there is one
    console = Console(file=io.StringIO(), width=200)
    render_report(console, report)
    text = console.file.getvalue()
    assert "preemptions" in text and "preempted" in text and "mean KV" in text
    assert plot_report(report, tmp_path / "kv.png").stat().st_size > 10_000


def test_files_from_before_preemption_read_as_no_preemption(out_a):
    j = report_json(load_report(out_a))  # SEGMENT_A's records have no preemption fields
    assert j["num_preemptions"] == 0


def test_killed_segment_counts_its_steps(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [plain_ok("a", 100, 4)])
    metrics = metrics_path_for(out)
    write_jsonl(metrics, SEGMENT_KILLED)
    with open(metrics, "ab") as f:
        f.write(b'{"type": "step", "t": 1.3, "sec')  # killed mid-flush: a torn last line is skipped
    report = load_report(out)
    seg = report.segments[0]
    assert seg.is_killed and seg.wall_seconds == 1.2 and seg.computed_prompt_tokens == 100
    assert seg.output_tokens == 4 and seg.peak_kv_bytes == 200
    j = report_json(report)
    assert j["wall_seconds"] == 1.2 and j["num_killed_segments"] == 1
    assert j["prefill_seconds"] == pytest.approx(0.5) and j["decode_seconds"] == pytest.approx(0.6)
    assert j["output_tokens_per_s"] == pytest.approx(4 / 1.2)


def test_two_segments_aggregate(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [plain_ok("a", 100, 4), plain_ok("b", 200, 3), plain_ok("c", 200, 3)])
    write_jsonl(metrics_path_for(out), SEGMENT_KILLED + SEGMENT_A)
    report = load_report(out)
    j = report_json(report)
    assert j["num_segments"] == 2 and j["num_killed_segments"] == 1
    assert j["requests"] == 3 and j["prompt_tokens"] == 500 and j["output_tokens"] == 10
    assert j["computed_prompt_tokens"] == 100 + 303
    assert j["wall_seconds"] == pytest.approx(1.2 + 2.5)
    assert j["prefill_seconds"] == pytest.approx(0.5 + 1.3)
    assert j["peak_kv_bytes"] == 450 and j["kv_budget_bytes"] == 1000  # the latest segment's budget
    # the second segment's steps follow the first's on one time axis
    assert report.steps.t.tolist() == pytest.approx([0.5, 1.2, 2.2, 2.7, 3.2])


def test_openai_output_and_errors_file(tmp_path):
    out, errs = tmp_path / "out.jsonl", tmp_path / "errs.jsonl"
    body = {"object": "text_completion", "usage": {"prompt_tokens": 50, "completion_tokens": 5,
                                                   "total_tokens": 55}}
    write_jsonl(out, [{"id": "batch_req_1", "custom_id": "x", "response": {"status_code": 200, "body": body},
                       "error": None}])
    write_jsonl(errs, [{"id": "batch_req_2", "custom_id": None, "line": 2, "response": None,
                        "error": {"code": "invalid_json", "message": "x"}}])
    write_jsonl(metrics_path_for(out), [run(errors_path=str(errs)), step(1.0, 1.0, 1, 5, 50, 10)])
    j = report_json(load_report(out))
    assert (j["requests"], j["failed"], j["prompt_tokens"], j["output_tokens"]) == (1, 1, 50, 5)


@pytest.mark.parametrize("content, match", [
    (b'{"type": "run"}\nnot json\n{"type": "run"}\n', r"metrics.jsonl:2: not valid JSON"),
    (b'{"type": "step", "t": 1}\n', "before any 'run' record"),
    (b'{"type": "run"}\n{"type": "step", "t": 1, "seconds": 1}\n', "'num_running' is missing"),
    (b'{"type": "run"}\n{"type": "step", "t": "1"}\n', "'t' is not a number"),
    (b'{"type": "bogus"}\n', "unknown record type"),
    (b"", "no 'run' record"),
])
def test_corrupt_metrics_is_a_user_error(tmp_path, content, match):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"")
    metrics_path_for(out).write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_report(out)


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no metrics file"):
        load_report(tmp_path / "out.jsonl")
    write_jsonl(tmp_path / "lost.jsonl.metrics.jsonl", SEGMENT_A)
    with pytest.raises(UserError, match="no output file"):
        load_report(tmp_path / "lost.jsonl.metrics.jsonl")


def test_recorder_round_trip_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "STEP_FLUSH_STEPS", 2)
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [plain_ok("a", 10, 2)])
    path = metrics_path_for(out)
    rec = MetricsRecorder(path, run_info={"kv_budget_bytes": 100, "plan_fingerprint": "p1"})
    for i in range(3):
        rec.record_step(seconds=0.01, num_running=1, num_decode_tokens=i and 1, num_prefill_tokens=0 if i else 9,
                        kv_bytes=10 + i)
    assert [r["type"] for r in map(orjson.loads, path.read_bytes().splitlines())] == ["run", "step", "step"]
    rec.close(wall_seconds=0.5, prompt_tokens=10, computed_prompt_tokens=9, output_tokens=2, peak_kv_bytes=12)
    with MetricsRecorder(path, run_info={"plan_fingerprint": "p1"}) as rec2:  # dies before close()
        rec2.record_step(seconds=0.2, num_running=1, num_decode_tokens=1, num_prefill_tokens=0, kv_bytes=5)
    report = load_report(out)
    assert [s.is_killed for s in report.segments] == [False, True]
    assert len(report.steps) == 4 and report.computed_prompt_tokens == 9
    assert report.segments[0].run_info["kv_budget_bytes"] == 100
    check_same_plan(out, "p1")
    with pytest.raises(UserError, match="another plan"):
        check_same_plan(out, "p2")
    assert stats_target_kind(out) == "output" and stats_target_kind(path) == "metrics"
    (tmp_path / "job.plan").write_bytes(PLAN_MAGIC + b"\0" * 8)
    assert stats_target_kind(tmp_path / "job.plan") == "plan"
    assert stats_target_kind(tmp_path / "missing.jsonl") == "output"


def test_render_one_and_several(out_a, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_bytes(out_a.read_bytes())
    halved = [dict(r, wall_seconds=1.25) if r["type"] == "summary" else r for r in SEGMENT_A]
    write_jsonl(metrics_path_for(other), halved)
    buf = io.StringIO()
    console = Console(file=buf, width=160, color_system=None)
    render_report(console, load_report(out_a))
    text = buf.getvalue()
    assert "output tokens/s" in text and "2.4" in text and "over time" in text and "45%" in text
    buf.seek(0), buf.truncate()
    render_report(console, [load_report(out_a), load_report(other)])
    assert "(0.50x)" in buf.getvalue() and "(2.00x)" in buf.getvalue()


def test_plot_report_renders(out_a, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    png = plot_report([load_report(out_a), load_report(out_a, name="again")], tmp_path / "r.png")
    pixels = image.imread(png)
    assert pixels.shape[:2] == (900, 1000)
    assert pixels[..., :3].std() > 0.05  # not blank


def test_over_time_headers_wrap_not_cut_on_a_narrow_console(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [plain_ok("a", 200, 3)])
    write_jsonl(metrics_path_for(out), [run(kv_budget_bytes=10**12)]
                + [step(float(i), 1.0, 12, 12, 1234, 10**9) for i in range(1, 50)])
    buf = io.StringIO()
    render_report(Console(file=buf, width=80, color_system=None), load_report(out))
    over_time = buf.getvalue().split("over time")[1]
    assert "…" not in over_time and "per step" in over_time and "tok/s" in over_time


def test_plot_without_matplotlib_says_how_to_install_it(out_a, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'batchrun\[plot\]'"):
        plot_report(load_report(out_a), tmp_path / "r.png")
