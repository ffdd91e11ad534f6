"""Every cascade-kernel specialization the engine can launch (batchrun.kernels.aot) compiled ahead of time for
sm_80 and sm_90 with Triton's compiler, on this machine without a GPU: none may fail or spill registers.
In a subprocess, as the interpreter (TRITON_INTERPRET=1, set for the other kernel tests) compiles nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _nvidia_tools() -> bool:
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or spec.origin is None:
        return False
    tools = Path(spec.origin).parent / "bin"
    return (tools / "ptxas").exists() and (tools / "cuobjdump").exists()


@pytest.mark.skipif(not _nvidia_tools(), reason="this triton has no NVIDIA backend with ptxas and cuobjdump")
def test_every_specialization_compiles_for_sm80_and_sm90_without_spills(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is what earlier ones did
    out = tmp_path / "aot.json"
    run = subprocess.run([sys.executable, "-m", "batchrun.kernels.aot", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    print(run.stdout)  # the register / spill / shared-memory table (pytest -s shows it)
    assert out.exists(), f"aot.py failed before reporting:\n{run.stderr[-3000:]}"
    reports = json.loads(out.read_text())
    capabilities = {r["name"].split()[0] for r in reports}
    assert capabilities == {"sm_80", "sm_90"}, capabilities
    assert {r["name"] for r in reports if r["error"]} == set(), [r for r in reports if r["error"]]
    assert {r["name"]: r["spill_bytes"] for r in reports if r["spill_bytes"]} == {}
    assert run.returncode == 0, run.stderr[-3000:]
