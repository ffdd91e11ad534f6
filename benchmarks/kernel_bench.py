"""Cascade decode attention on one GPU: batchrun.kernels (prefix part + own part + merge) against torch SDPA
over per-request materialised KV (the non-cascade peer) and against the torch cascade backend
(batchrun.attention), in one run, Llama-3-8B heads (32 query heads, 8 KV heads, D = 128).

  python benchmarks/kernel_bench.py                  # the full grid: prefix 1k-32k, group 16-256, own 64-512
  python benchmarks/kernel_bench.py --quick          # a few points (gpu_check.sh)

Prints a markdown table: microseconds (median of CUDA-event timings, L2 flushed), speedups, the bytes the
cascade must read at least over its time (GB/s) next to a measured device copy bandwidth. Needs CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    prefix_len: int
    group_size: int
    own_len: int
    cascade_us: float
    torch_cascade_us: float | None
    sdpa_us: float | None
    cascade_gbps: float
    max_abs_diff: float  # cascade output against the torch cascade backend and SDPA


def bench_us(fn: Callable[[], object]) -> float:
    """Median microseconds over CUDA events, after warm-up, with L2 flushed before each run."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbps(device: torch.device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)  # 1 GiB, far above any L2
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9  # bytes read + bytes written


@dataclass
class Case:
    """One group: group_size decode requests sharing a prefix, each with own_len own keys, in a slot pool."""

    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [P + B * L, Hkv, D]: the prefix, then each request's own keys
    v_cache: torch.Tensor
    prefix_meta: dict[str, torch.Tensor]
    own_meta: dict[str, torch.Tensor]
    rows: torch.Tensor
    sm_scale: float


def make_case(prefix_len: int, group_size: int, own_len: int, dtype: torch.dtype, device: torch.device) -> Case:
    num_slots = prefix_len + group_size * own_len
    shape = (num_slots, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
    q = torch.randn((group_size, NUM_Q_HEADS, HEAD_DIM), dtype=dtype, device=device)

    def index(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.int32)

    prefix_meta = dict(
        q_start=index(torch.tensor([0])), q_len=index(torch.tensor([group_size])),
        kv_indices=index(torch.arange(prefix_len)), kv_indptr=index(torch.tensor([0, prefix_len])),
    )
    own_meta = dict(
        q_indptr=index(torch.arange(group_size + 1)),
        kv_indices=index(torch.arange(prefix_len, num_slots)),
        kv_indptr=index(torch.arange(group_size + 1) * own_len),
    )
    rows = index(torch.arange(group_size))
    return Case(q, k_cache, v_cache, prefix_meta, own_meta, rows, HEAD_DIM**-0.5)


def run_cascade(module, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's composition: prefix part, own part, merge of the prefix state into the own rows."""
    common = dict(k_cache=case.k_cache, v_cache=case.v_cache, sm_scale=case.sm_scale)
    o_pre, lse_pre = module.prefix_attention(case.q, **common, **case.prefix_meta)
    o, lse = module.own_attention(case.q, **common, **case.own_meta)
    module.merge_state_into(o, lse, o_pre, lse_pre, rows=case.rows)
    return o, lse


def torch_cascade_fn(case: Case) -> Callable[[], tuple[torch.Tensor, torch.Tensor]] | None:
    """The torch backend, planned once outside the timing as the engine plans once per step."""
    try:
        from batchrun.attention import AttentionBackend
    except ImportError:
        return None
    backend = AttentionBackend(case.q.device)
    host = {name: {k: t.cpu().numpy() for k, t in meta.items()}
            for name, meta in (("prefix", case.prefix_meta), ("own", case.own_meta))}
    prefix_plan = backend.plan_prefix(**host["prefix"])
    own_plan = backend.plan_own(**host["own"])
    rows = case.rows.long()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        o_pre, lse_pre = backend.prefix(prefix_plan, case.q, case.k_cache, case.v_cache, sm_scale=case.sm_scale)
        o, lse = backend.own(own_plan, case.q, case.k_cache, case.v_cache, sm_scale=case.sm_scale)
        backend.merge_state_into(o, lse, o_pre, lse_pre, rows=rows)
        return o, lse

    return run


def sdpa_fn(case: Case, prefix_len: int, own_len: int) -> Callable[[], torch.Tensor]:
    """Flash SDPA over each request's materialised [prefix ‖ own] KV: the prefix is read once per request."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group_size = case.q.shape[0]
    own = torch.arange(prefix_len, prefix_len + group_size * own_len, device=case.q.device).view(group_size, -1)
    slots = torch.cat([torch.arange(prefix_len, device=own.device).expand(group_size, -1), own], dim=1)
    k = case.k_cache[slots].transpose(1, 2).contiguous()  # [B, Hkv, P + L, D]
    v = case.v_cache[slots].transpose(1, 2).contiguous()
    q = case.q.unsqueeze(2)  # [B, Hq, 1, D]

    def run() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, scale=case.sm_scale, enable_gqa=True)

    return run


def measure(
    prefix_len: int, group_size: int, own_len: int, *, dtype: torch.dtype, device: torch.device, max_kv_gib: float
) -> Row:
    import batchrun.kernels as kernels

    case = make_case(prefix_len, group_size, own_len, dtype, device)
    cascade_us = bench_us(lambda: run_cascade(kernels, case))
    o, _ = run_cascade(kernels, case)

    torch_run = torch_cascade_fn(case)
    torch_us, diff = None, 0.0
    if torch_run is not None:
        torch_us = bench_us(torch_run)
        diff = (o - torch_run()[0]).abs().max().item()

    elem = case.k_cache.element_size()
    materialised = 2 * group_size * (prefix_len + own_len) * NUM_KV_HEADS * HEAD_DIM * elem
    sdpa_us = None
    if materialised <= max_kv_gib * 2**30:
        try:
            sdpa_run = sdpa_fn(case, prefix_len, own_len)
            sdpa_us = bench_us(sdpa_run)
            diff = max(diff, (o - sdpa_run().squeeze(2).float()).abs().max().item())
        except RuntimeError as e:  # the flash backend refuses some shape or dtype on this build
            print(f"SDPA flash failed at P={prefix_len} B={group_size}: {e}", file=sys.stderr)
    # The least the cascade must move: the prefix KV once, each own KV once, q in, o out (fp32).
    kv_bytes = 2 * (prefix_len + group_size * own_len) * NUM_KV_HEADS * HEAD_DIM * elem
    io_bytes = group_size * NUM_Q_HEADS * HEAD_DIM * (elem + 4)
    gbps = (kv_bytes + io_bytes) / (cascade_us * 1e-6) / 1e9
    return Row(prefix_len, group_size, own_len, cascade_us, torch_us, sdpa_us, gbps, diff)


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def print_table(rows: list[Row], copy_gbps: float) -> None:
    print(f"\ndevice copy bandwidth (read + write): {copy_gbps:.0f} GB/s\n")
    print("| prefix | group | own | cascade µs | torch cascade µs | SDPA flash µs | × SDPA | × torch | GB/s | % copy BW"
          " | max abs diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        vs_sdpa = None if r.sdpa_us is None else r.sdpa_us / r.cascade_us
        vs_torch = None if r.torch_cascade_us is None else r.torch_cascade_us / r.cascade_us
        print(f"| {r.prefix_len} | {r.group_size} | {r.own_len} | {r.cascade_us:.1f} | {fmt(r.torch_cascade_us)}"
              f" | {fmt(r.sdpa_us)} | {fmt(vs_sdpa, '.2f')} | {fmt(vs_torch, '.2f')} | {r.cascade_gbps:.0f}"
              f" | {100 * r.cascade_gbps / copy_gbps:.0f}% | {r.max_abs_diff:.1e} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="1024,4096,16384,32768", help="shared prefix lengths")
    parser.add_argument("--group", default="16,64,256", help="requests per group (share degree)")
    parser.add_argument("--own", default="64,512", help="own keys per request")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="prefix 4096,32768; group 16,256; own 512")
    parser.add_argument("--max-kv-gib", type=float, help="skip SDPA above this materialised KV (default: 35%% of GPU)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA device; the Triton kernels are benchmarked on GPU only (nothing measured).")
        return 0
    if args.quick:
        args.prefix, args.group, args.own = "4096,32768", "16,256", "512"
    max_kv_gib = args.max_kv_gib or 0.35 * torch.cuda.get_device_properties(0).total_memory / 2**30
    grid = itertools.product(*(map(int, s.split(",")) for s in (args.prefix, args.group, args.own)))
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, Hq={NUM_Q_HEADS} Hkv={NUM_KV_HEADS} D={HEAD_DIM},"
          " decode (one query per request), one group")
    copy_gbps = copy_bandwidth_gbps(torch.device("cuda"))
    rows = []
    for p, g, o in grid:
        rows.append(measure(p, g, o, dtype=DTYPES[args.dtype], device=torch.device("cuda"), max_kv_gib=max_kv_gib))
        torch.cuda.empty_cache()  # the next point's materialised KV may need the memory back
    print_table(rows, copy_gbps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": copy_gbps, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
