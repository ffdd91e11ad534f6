"""Ahead-of-time compilation, on a machine without a GPU, of every cascade-kernel specialization the engine can
launch for sm_80 and sm_90: each comes from a real step's launches (so the argument types are those `attend`
passes) and reports registers, spills and shared memory.  python -m batchrun.kernels.aot [--json FILE]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import NamedTuple

import numpy as np
import torch
import triton

from .cascade import cascade_kernel
from .configs import CAPABILITIES
from .launch import Launch, launches
from .parts import OwnPart, PrefixPart, prepare_step

# (head size, dtype, GQA ratio): every dtype at D = 64 and 128; D = 80 and 96 (padded to 128) and the ratios
# that change the tile's row mapping (1: one row a token, 7: not a power of two) in bf16, the CUDA default.
SPECS = [(d, dt, 4) for d in (64, 128) for dt in (torch.float16, torch.bfloat16, torch.float32)] + [
    (80, torch.bfloat16, 4), (96, torch.bfloat16, 4), (128, torch.bfloat16, 1), (128, torch.bfloat16, 7),
]
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64"}


class Report(NamedTuple):
    name: str
    registers: int
    spill_bytes: int  # local memory a thread uses: ptxas puts spills there
    shared_bytes: int
    error: str


def step_launches(head_dim: int, dtype: torch.dtype, group: int, capability: int) -> list[Launch]:
    """A mixed step on the CPU (3 decodes under one shared prefix, one long prefill) has both tile classes."""
    num_kv_heads = 2
    q = torch.zeros((203, num_kv_heads * group, head_dim), dtype=dtype)
    cache = torch.zeros((600, num_kv_heads, head_dim), dtype=dtype)
    own = OwnPart(q_indptr=np.array([0, 1, 2, 3, 203]), kv_indices=np.arange(320),
                  kv_indptr=np.array([0, 40, 80, 120, 320]))
    prefix = PrefixPart(q_start=np.array([0]), q_len=np.array([3]), kv_indices=np.arange(320, 600),
                        kv_indptr=np.array([0, 280]))
    step = prepare_step(num_rows=q.shape[0], own=own, prefixes=[prefix], num_heads=q.shape[1],
                     num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=torch.device("cpu"),
                     capability=capability)
    return launches(step, q, cache, cache, sm_scale=head_dim**-0.5)[2]


def _signature(launch: Launch) -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    """Triton's types for the arguments, and the 16-divisibility it would infer for them at launch."""
    signature, attrs = {}, {}
    for name, value in launch.args.items():
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            is_aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, int):
            assert value != 1, f"{name} = 1 would be specialized as a constant at launch"
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            is_aligned = value % 16 == 0
        else:
            signature[name], is_aligned = "fp32", False
        if is_aligned:
            attrs[(cascade_kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in launch.constexprs})
    return {n: signature[n] for n in cascade_kernel.arg_names}, attrs


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) from cuobjdump, which Triton ships beside ptxas."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    fields = dict(w.split(":", 1) for w in out.stdout.split() if w.split(":", 1)[0] in ("REG", "LOCAL", "STACK"))
    return int(fields["REG"]), int(fields["LOCAL"]) + int(fields["STACK"])


def compile_launch(launch: Launch, capability: int) -> Report:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    c = launch.constexprs
    name = (f"sm_{capability} {launch.args['q_ptr'].dtype} D={c['HEAD_DIM']} group={c['GROUP']} "
            f"{c['BLOCK_M']}x{c['BLOCK_N']} w{launch.options['num_warps']} s{launch.options['num_stages']}")
    signature, attrs = _signature(launch)
    try:
        src = ASTSource(fn=cascade_kernel, signature=signature, constexprs=c, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=launch.options)
        registers, spill_bytes = _resource_usage(kernel.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - a compile error is a result to report, not a crash
        return Report(name, 0, 0, 0, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return Report(name, registers, spill_bytes, kernel.metadata.shared, "")


def compile_all() -> list[Report]:
    """Every distinct specialization of SPECS on every capability."""
    seen, reports = set(), []
    for capability in CAPABILITIES:
        for head_dim, dtype, group in SPECS:
            for launch in step_launches(head_dim, dtype, group, capability):
                key = (capability, str(dtype), tuple(launch.constexprs.items()), tuple(launch.options.items()))
                if key not in seen:
                    seen.add(key)
                    reports.append(compile_launch(launch, capability))
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the reports to this file")
    args = parser.parse_args()
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET: the interpreter compiles nothing"
    reports = compile_all()
    print(f"triton {triton.__version__}\n| kernel | registers | spill bytes | shared bytes | error |")
    print("| --- | --: | --: | --: | --- |")
    for r in reports:
        print(f"| {r.name} | {r.registers} | {r.spill_bytes} | {r.shared_bytes} | {r.error} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r._asdict() for r in reports], f, indent=1)
    return 1 if any(r.error or r.spill_bytes for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
