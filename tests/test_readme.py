"""The README's examples run verbatim when pasted: every ```sh block (as one bash script) and every ```python
block, in a folder holding a copy of sample_data/, with the built-in model; lines marked `# needs a GPU` or
`# needs a network` are left out. Every line of a ```json block is one valid request."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from batchrun.requests import parse_object

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
SKIP_MARKS = ("# needs a GPU", "# needs a network")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.M | re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "sample_data", folder / "sample_data")
    return folder


def run_in(folder: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    # The interpreter's folder first on PATH: `batchrun` is the one installed beside it.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_examples() -> None:
    assert len(blocks("sh")) >= 3 and len(blocks("python")) >= 2 and len(blocks("json")) >= 2
    assert any(mark in block for block in blocks("sh") for mark in SKIP_MARKS)


@pytest.mark.parametrize("index", range(len(blocks("sh"))))
def test_shell_examples_run_verbatim(workdir: Path, index: int) -> None:
    script = "\n".join(line for line in blocks("sh")[index].splitlines() if not any(m in line for m in SKIP_MARKS))
    result = run_in(workdir, ["bash", "-euo", "pipefail", "-c", script])
    assert result.returncode == 0, (script, result.stderr[-3000:])


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_examples_run_verbatim(workdir: Path, index: int) -> None:
    result = run_in(workdir, [sys.executable, "-c", blocks("python")[index]])
    assert result.returncode == 0, (blocks("python")[index], result.stderr[-3000:])


def test_json_examples_are_one_request_per_line() -> None:
    for block in blocks("json"):
        for line_no, line in enumerate(block.splitlines(), start=1):
            parse_object(orjson.loads(line), line_no)  # raises on a line that is not a whole request
