"""The CPU attention op (csrc/cascade_cpu.cpp), compiled by torch.utils.cpp_extension into a per-user cache
directory: at `make setup` (`main`), else on first use; later loads take ~0.1 s.
`load_op` raises `OpUnavailable` (with the reason) where it cannot run: no AVX-512, no compiler, a failed build.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "cascade_cpu.cpp"
# The kernel is written with AVX-512 intrinsics; fp16 pools widen through F16C.
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c"]
NAME = "batchrun_cascade_cpu"


class OpUnavailable(RuntimeError):
    """The op cannot run on this machine; the message says why (the torch backend runs instead)."""


_op: ModuleType | None = None


def build_dir() -> Path:
    """$BATCHRUN_CACHE_DIR (default ~/.cache/batchrun) / cpu_op / torch-<version>: one build per torch build,
    rebuilt by cpp_extension when the source or the flags change."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = os.environ.get("BATCHRUN_CACHE_DIR") or cache / "batchrun"
    return Path(root) / "cpu_op" / f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def load_op(*, verbose: bool = False) -> ModuleType:
    """The compiled op (built here if the cache has none); raises OpUnavailable."""
    global _op
    if _op is not None:
        return _op
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise OpUnavailable("this CPU has no AVX-512")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise OpUnavailable("no C++ compiler (c++ or $CXX)")
    from torch.utils import cpp_extension  # here: it imports setuptools, which only the build needs

    _put_ninja_on_path()

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _op = cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(directory),
                                 extra_cflags=CFLAGS, verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:  # a compiler error, no ninja, an unloadable library
        last_line = (str(e).strip().splitlines() or [repr(e)])[-1]
        raise OpUnavailable(f"the build failed: {last_line}") from e
    return _op


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH: the ninja wheel's binary serves when the venv is not activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # the build then fails with cpp_extension's own message
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def main() -> int:
    """Builds (or finds) the op; `make setup` runs this so the first run does not pay the build."""
    try:
        load_op(verbose="-v" in sys.argv)
    except OpUnavailable as e:
        print(f"batchrun: the CPU attention op is not built: {e}; the torch backend will run on CPU")
        return 1 if e.__cause__ is not None else 0  # a failed build is an error; a machine without AVX-512 is not
    print(f"batchrun: the CPU attention op is ready in {build_dir()}")
    return 0
