"""Cascade decode attention as the engine runs it: batchrun.kernels' work list made once (`prepare_step`, timed apart
on the host), then per layer one `attend` (own part + prefix part, merged in the kernel), against SDPA over
per-request materialised KV (the non-cascade peer) and the torch cascade backend, Llama-3-8B heads by default.

  python benchmarks/kernel_bench.py            # prefix 1k/8k/32k x group 16/64/256, own 512 (gpu_check.sh)
  python benchmarks/kernel_bench.py --quick    # CUDA: two corner points; CPU (TRITON_INTERPRET=1): tiny smoke run

Prints a markdown table: microseconds (CUDA: median of CUDA-event timings, L2 flushed; CPU: wall clock),
speedups, the bytes the cascade must read at least over its time (GB/s) as a share of a measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    prefix_len: int
    group_size: int
    own_len: int
    prepare_us: float  # host: the step's work list and its one copy to the device
    cascade_us: float  # one layer: attend
    torch_cascade_us: float
    sdpa_us: float | None
    cascade_gbps: float
    max_abs_diff: float  # cascade output against the torch cascade backend and SDPA


def bench_us(fn: Callable[[], object]) -> float:
    """CUDA: median microseconds over CUDA events after warm-up, L2 flushed; CPU: median wall clock of 3."""
    if torch.cuda.is_available():
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def copy_bandwidth_gbps(device: torch.device) -> float:
    src = torch.empty((1 << 30) if device.type == "cuda" else (1 << 26), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)  # 1 GiB on CUDA, far above any L2
    us = bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9  # bytes read + bytes written


@dataclass
class Case:
    """One group: group_size decode requests sharing a prefix, each with own_len own keys, in a slot pool."""

    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [P + B * L, Hkv, D]: the prefix, then each request's own keys
    v_cache: torch.Tensor
    own: dict[str, np.ndarray]  # host metadata, as the engine has it
    prefix: dict[str, np.ndarray]
    sm_scale: float


def make_case(prefix_len: int, group_size: int, own_len: int, *, heads: tuple[int, int, int], dtype: torch.dtype,
              device: torch.device) -> Case:
    num_heads, num_kv_heads, head_dim = heads
    num_slots = prefix_len + group_size * own_len
    k_cache, v_cache = (torch.randn((num_slots, num_kv_heads, head_dim), dtype=dtype, device=device)
                        for _ in range(2))
    q = torch.randn((group_size, num_heads, head_dim), dtype=dtype, device=device)
    own = dict(q_indptr=np.arange(group_size + 1), kv_indices=np.arange(prefix_len, num_slots),
               kv_indptr=np.arange(group_size + 1) * own_len)
    prefix = dict(q_start=np.array([0]), q_len=np.array([group_size]), kv_indices=np.arange(prefix_len),
                  kv_indptr=np.array([0, prefix_len]))
    return Case(q, k_cache, v_cache, own, prefix, head_dim**-0.5)


def cascade_fn(case: Case) -> tuple[float, Callable[[], torch.Tensor]]:
    """(host µs of the step's work list, one layer's attention): the engine's planned path."""
    import batchrun.kernels as kernels

    def prepare() -> kernels.StepWork:
        return kernels.prepare_step(
            num_rows=case.q.shape[0], own=kernels.OwnPart(**case.own), prefixes=[kernels.PrefixPart(**case.prefix)],
            num_heads=case.q.shape[1], num_kv_heads=case.k_cache.shape[1], head_dim=case.q.shape[2],
            dtype=case.q.dtype, device=case.q.device,
        )

    prepare()  # warm-up (the device properties are read once)
    start = time.perf_counter()
    step_work = prepare()
    prepare_us = 1e6 * (time.perf_counter() - start)
    return prepare_us, lambda: kernels.attend(step_work, case.q, case.k_cache, case.v_cache, sm_scale=case.sm_scale)[0]


def torch_cascade_fn(case: Case) -> Callable[[], torch.Tensor]:
    """The torch backend (the reference, and CUDA without Triton), prepared once outside the timing as the engine
    prepares once per step."""
    from batchrun.attention import CascadeInput, OwnPart, PrefixPart, TorchBackend

    backend = TorchBackend(case.q.device)
    step = CascadeInput(num_rows=case.q.shape[0], own=OwnPart(**case.own), prefixes=(PrefixPart(**case.prefix),),
                        gqa_ratio=case.q.shape[1] // case.k_cache.shape[1])
    layout = backend.prepare(step)
    return lambda: backend.attend(layout, case.q, case.k_cache, case.v_cache, sm_scale=case.sm_scale).o


def sdpa_fn(case: Case, prefix_len: int, own_len: int) -> Callable[[], torch.Tensor]:
    """SDPA (flash on CUDA) over each request's materialised [prefix ‖ own] KV: the prefix read per request."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group_size = case.q.shape[0]
    own = torch.arange(prefix_len, prefix_len + group_size * own_len, device=case.q.device).view(group_size, -1)
    slots = torch.cat([torch.arange(prefix_len, device=own.device).expand(group_size, -1), own], dim=1)
    k = case.k_cache[slots].transpose(1, 2).contiguous()  # [B, Hkv, P + L, D]
    v = case.v_cache[slots].transpose(1, 2).contiguous()
    q = case.q.unsqueeze(2)  # [B, Hq, 1, D]
    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]

    def run() -> torch.Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, scale=case.sm_scale, enable_gqa=True).squeeze(2)

    return run


def measure(prefix_len: int, group_size: int, own_len: int, *, heads: tuple[int, int, int], dtype: torch.dtype,
            device: torch.device, max_kv_gib: float) -> Row:
    case = make_case(prefix_len, group_size, own_len, heads=heads, dtype=dtype, device=device)
    prepare_us, run = cascade_fn(case)
    cascade_us = bench_us(run)
    o = run()
    torch_run = torch_cascade_fn(case)
    torch_us = bench_us(torch_run)
    diff = (o - torch_run()).abs().max().item()
    elem = case.k_cache.element_size()
    num_heads, num_kv_heads, head_dim = heads
    sdpa_us = None
    if 2 * group_size * (prefix_len + own_len) * num_kv_heads * head_dim * elem <= max_kv_gib * 2**30:
        try:
            sdpa_run = sdpa_fn(case, prefix_len, own_len)
            sdpa_us = bench_us(sdpa_run)
            diff = max(diff, (o - sdpa_run().float()).abs().max().item())
        except RuntimeError as e:  # the flash backend refuses some shape or dtype on this build
            print(f"SDPA failed at P={prefix_len} B={group_size}: {e}", file=sys.stderr)
    # The least the cascade must move: the prefix KV once, each own KV once, q in, o out (fp32).
    kv_bytes = 2 * (prefix_len + group_size * own_len) * num_kv_heads * head_dim * elem
    io_bytes = group_size * num_heads * head_dim * (elem + 4)
    gbps = (kv_bytes + io_bytes) / (cascade_us * 1e-6) / 1e9
    return Row(prefix_len, group_size, own_len, prepare_us, cascade_us, torch_us, sdpa_us, gbps, diff)


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def print_table(rows: list[Row], copy_gbps: float) -> None:
    print(f"\ndevice copy bandwidth (read + write): {copy_gbps:.0f} GB/s\n")
    print("| prefix | group | own | prepare µs (host) | cascade µs | torch cascade µs | SDPA µs | × SDPA | × torch"
          " | GB/s | % copy BW | max abs diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        vs_sdpa = None if r.sdpa_us is None else r.sdpa_us / r.cascade_us
        vs_torch = r.torch_cascade_us / r.cascade_us
        print(f"| {r.prefix_len} | {r.group_size} | {r.own_len} | {r.prepare_us:.0f} | {r.cascade_us:.1f}"
              f" | {r.torch_cascade_us:.1f} | {fmt(r.sdpa_us)} | {fmt(vs_sdpa, '.2f')} | {fmt(vs_torch, '.2f')}"
              f" | {r.cascade_gbps:.0f} | {100 * r.cascade_gbps / copy_gbps:.0f}% | {r.max_abs_diff:.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="1024,8192,32768", help="shared prefix lengths")
    parser.add_argument("--group", default="16,64,256", help="requests per group (share degree)")
    parser.add_argument("--own", default="512", help="own keys per request")
    parser.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="CUDA: prefix 8192,32768 x group 64,256; CPU: tiny")
    parser.add_argument("--max-kv-gib", type=float, help="skip SDPA above this materialised KV (default: 35%% of GPU)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    is_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if is_cuda else "cpu")
    if args.quick and is_cuda:
        args.prefix, args.group = "8192,32768", "64,256"
    elif args.quick:  # the interpreter's smoke run: every step of the bench at tiny shapes
        args.prefix, args.group, args.own, args.heads, args.dtype = "64", "4", "16", "4,2,64", "fp32"
    elif not is_cuda:
        print("kernel_bench: no CUDA device; only --quick (a smoke run under TRITON_INTERPRET=1) runs on CPU.")
        return 0
    heads = tuple(map(int, args.heads.split(",")))
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if is_cuda else 1.0
    max_kv_gib = args.max_kv_gib or 0.35 * total_gib
    grid = itertools.product(*(map(int, s.split(",")) for s in (args.prefix, args.group, args.own)))
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if is_cuda else "CPU (Triton interpreter)"
    print(f"{name}, {args.dtype}, Hq={heads[0]} Hkv={heads[1]} D={heads[2]}, decode (one query per request),"
          " one group")
    copy_gbps = copy_bandwidth_gbps(device)
    rows = []
    for p, g, o in grid:
        rows.append(measure(p, g, o, heads=heads, dtype=DTYPES[args.dtype], device=device, max_kv_gib=max_kv_gib))
        if is_cuda:
            torch.cuda.empty_cache()  # the next point's materialised KV may need the memory back
    print_table(rows, copy_gbps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": copy_gbps, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
