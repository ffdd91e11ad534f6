"""`--model` as a Hub id: found in a Hugging Face cache laid out as huggingface_hub lays it out (refs, snapshots
of symlinks into blobs), offline; the error for a model found nowhere says where it looked and what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from batchrun.errors import UserError
from batchrun.model.loader import load_model
from batchrun.model.spec import resolve_model
from checkpoints import make_checkpoint

REPO_ID = "test-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str = REPO_ID) -> Path:
    """Writes `repo_id` into the cache folder `cache` (refs/main → COMMIT, snapshots/COMMIT/* symlinked to
    blobs/*) and returns its snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = make_checkpoint(repo / "snapshots", name=COMMIT)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted(snapshot.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        file.rename(blob)
        file.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    fake_hub_cache(cache)
    return cache


def test_hub_id_resolves_from_the_cache_offline(hub_cache: Path) -> None:
    spec = resolve_model(REPO_ID)
    assert spec.path == hub_cache / "models--test-org--tiny-llama" / "snapshots" / COMMIT
    assert spec.location == REPO_ID and spec.repo_id == REPO_ID  # a plan names it by its id
    assert spec.config.model_type == "llama"
    model = load_model(spec, device=torch.device("cpu"))
    assert model.weights.embed.shape == (4096, 64)


def test_a_model_found_nowhere_says_where_it_looked(hub_cache: Path) -> None:
    with pytest.raises(UserError) as info:
        resolve_model("test-org/absent")
    message = str(info.value)
    for part in ("builtin-tiny", str(Path("test-org/absent").absolute()), str(hub_cache), "--download",
                 "Supported architectures: llama", "hf download test-org/absent --local-dir DIR"):
        assert part in message, (part, message)
    with pytest.raises(UserError, match="and not a Hub id. Supported architectures"):
        resolve_model("./not/a/dir/or/id")


def test_vllm_style_command_with_a_hub_id(tmp_path: Path) -> None:
    fake_hub_cache(tmp_path / "hub")
    input_path = tmp_path / "in.jsonl"
    input_path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}: why?", "max_tokens": 4})
                                  + "\n" for i in range(3)))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "batchrun", "run", "-i", str(input_path), "-o",
                             str(tmp_path / "out.jsonl"), "--model", REPO_ID, "--threads", "1"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2"] and all(1 <= len(r["token_ids"]) <= 4 for r in rows)


def test_download_without_a_network_says_the_download_failed(hub_cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no request leaves this test
    with pytest.raises(UserError, match="test-org/absent' not found: .* the download failed"):
        resolve_model("test-org/absent", download=True)
    assert resolve_model(REPO_ID, download=True).repo_id == REPO_ID  # in the cache: found, nothing fetched
