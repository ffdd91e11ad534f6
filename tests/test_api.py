"""The Python API: `batchrun.generate` against `batchrun run` on the same requests (same engine, same tokens),
results in input order with errors in place, files only where asked; `import batchrun` stays cheap."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

import batchrun

SAMPLE = Path(__file__).parent.parent / "sample_data"


def sample_requests(num: int) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "requests.jsonl").read_text().splitlines()[:num]]


def test_generate_matches_run_in_input_order(tmp_path: Path) -> None:
    requests = sample_requests(8)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    outcome = batchrun.run_job(tmp_path / "in.jsonl", tmp_path / "out.jsonl", threads=1,
                               console=Console(file=io.StringIO()))
    assert outcome.num_completed == 8
    by_id = {row["id"]: row for row in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    results = batchrun.generate(requests, threads=1)
    assert [r.id for r in results] == [r["id"] for r in requests]
    for result in results:
        row = by_id[result.id]
        assert (result.token_ids, result.text, result.finish_reason) == (row["token_ids"], row["text"],
                                                                         row["finish_reason"])
        assert result.prompt_tokens == row["usage"]["prompt_tokens"] and result.error is None


def test_generate_prompts_defaults_and_errors_in_place(tmp_path: Path) -> None:
    results = batchrun.generate(["first prompt", {"prompt": 7}, {"id": "m", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 2}], max_tokens=3, temperature=0, threads=1)
    assert [r.id for r in results] == ["line-1", None, "m"]
    assert 1 <= len(results[0].token_ids) <= 3 and 1 <= len(results[2].token_ids) <= 2  # its own max_tokens wins
    assert results[1].error is not None and results[1].error.startswith("invalid_type") and results[1].text is None
    assert batchrun.generate([]) == []


def test_generate_writes_files_only_where_asked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    batchrun.generate(["a prompt"], max_tokens=2, threads=1)
    assert list(tmp_path.iterdir()) == []
    batchrun.generate(["a prompt"], max_tokens=2, threads=1, workdir=tmp_path / "job")
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["input.jsonl", "input.plan"]


def test_import_batchrun_is_cheap() -> None:
    code = ("import sys, batchrun\nheavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', "
            "'numpy', 'rich')]\nassert not heavy, heavy\nassert callable(batchrun.generate)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
