"""batchrun's CPU extension: the cascade attention op (csrc/cascade_attention.cpp, used by
attention.cpu_backend) and the fused layer ops (csrc/layer_ops.cpp, used by model.layer_ops), one module
(csrc/module.cpp) compiled by torch.utils.cpp_extension into a per-user cache directory: at `make setup`
(`main`), else on first use; later loads take ~0.1 s. `load_op` raises `OpUnavailable` (with the reason) where
it cannot run: no AVX-512, no compiler, a failed build.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("module.cpp", "cascade_attention.cpp", "layer_ops.cpp")]
# Written with AVX-512 intrinsics; fp16 widens through F16C. No contraction of a * b + c into one fused
# multiply-add unless the source asks for it: the layer ops round as torch's kernels do. -fopenmp: at::parallel_for
# is an inline OpenMP loop in torch's OpenMP builds, serial without it; the library then needs libgomp.so.1, which
# torch has already loaded (one OpenMP runtime, one thread pool).
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c", "-ffp-contract=off",
          "-fopenmp"]
LDFLAGS = ["-fopenmp"]
NAME = "batchrun_cpu"


class OpUnavailable(RuntimeError):
    """The extension cannot run on this machine; the message says why (torch's own ops run instead)."""


_op: ModuleType | None = None


def build_dir() -> Path:
    """$BATCHRUN_CACHE_DIR (default ~/.cache/batchrun) / cpu_ext / torch-<version>: one build per torch build,
    rebuilt by cpp_extension when the source or the flags change."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = os.environ.get("BATCHRUN_CACHE_DIR") or cache / "batchrun"
    return Path(root) / "cpu_ext" / f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def load_op(*, verbose: bool = False) -> ModuleType:
    """The compiled extension (built here if the cache has none); raises OpUnavailable."""
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
        _op = cpp_extension.load(name=NAME, sources=[str(source) for source in SOURCES], build_directory=str(directory),
                                 extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=verbose)
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
    """Builds (or finds) the extension; `make setup` runs this so the first run does not pay the build."""
    try:
        load_op(verbose="-v" in sys.argv)
    except OpUnavailable as e:
        print(f"batchrun: the CPU extension is not built: {e}; torch's ops will run on CPU")
        return 1 if e.__cause__ is not None else 0  # a failed build is an error; a machine without AVX-512 is not
    print(f"batchrun: the CPU extension is ready in {build_dir()}")
    return 0
