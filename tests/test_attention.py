"""The cascade backends (torch: prefix parts per depth + own part + LSE merges; cpu: the C++ op, one call per
part) against plain float64 attention over each row's concatenated KV, on random shapes, GQA, multi-level
prefixes, chunked prefill and empty parts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchrun import attention as attn
from batchrun import cpu_ext
from batchrun.attention import torch_backend, torch_buckets


def _backend(q: torch.Tensor) -> attn.TorchBackend:
    return attn.TorchBackend(q.device, compute_dtype=torch.promote_types(q.dtype, torch.float32))


def _host(a: torch.Tensor) -> np.ndarray:
    return a.detach().cpu().numpy()


def _no_own() -> attn.OwnPart:
    """An own part that owns no row."""
    empty = np.zeros(0, np.int64)
    return attn.OwnPart(q_indptr=np.zeros(1, np.int64), kv_indices=empty, kv_indptr=np.zeros(1, np.int64))


def _attend(backend, q, k_cache, v_cache, *, own, prefixes=(), sm_scale):
    step = attn.CascadeInput(num_rows=q.shape[0], own=own, prefixes=tuple(prefixes),
                             gqa_ratio=q.shape[1] // k_cache.shape[1])
    return backend.attend(backend.prepare(step), q, k_cache, v_cache, sm_scale=sm_scale)


def prefix_attention(q, k_cache, v_cache, *, q_start, q_len, kv_indices, kv_indptr, sm_scale):
    """A prefix part alone through the torch backend, with the metadata given as tensors; the state of its
    segments' rows in segment order."""
    part = attn.PrefixPart(_host(q_start), _host(q_len), _host(kv_indices), _host(kv_indptr))
    o, lse = _attend(_backend(q), q, k_cache, v_cache, own=_no_own(), prefixes=[part], sm_scale=sm_scale)
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(q_start.tolist(), q_len.tolist(), strict=True)])
    return attn.AttentionState(o[rows], lse[rows])


def own_attention(q, k_cache, v_cache, *, q_indptr, kv_indices, kv_indptr, sm_scale):
    """The own part alone through the torch backend, with the metadata given as tensors."""
    own = attn.OwnPart(_host(q_indptr), _host(kv_indices), _host(kv_indptr))
    return _attend(_backend(q), q, k_cache, v_cache, own=own, sm_scale=sm_scale)


def _reference(q, k_cache, v_cache, keys_per_row, sm_scale):
    """Plain softmax attention, row by row, over explicit key lists; natural-log LSE."""
    num_rows, num_q_heads, head_dim = q.shape
    gqa_ratio = num_q_heads // k_cache.shape[1]
    o = torch.zeros(num_rows, num_q_heads, head_dim, dtype=torch.float64)
    lse = torch.full((num_rows, num_q_heads), -math.inf, dtype=torch.float64)
    for r, keys in enumerate(keys_per_row):
        if not keys:
            continue
        idx = torch.tensor(keys)
        k = k_cache[idx].double().repeat_interleave(gqa_ratio, dim=1)  # [L, Hq, D]
        v = v_cache[idx].double().repeat_interleave(gqa_ratio, dim=1)
        s = torch.einsum("hd,lhd->hl", q[r].double(), k) * sm_scale
        lse[r] = torch.logsumexp(s, -1)
        o[r] = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v)
    return o, lse


def _random_cascade(rng, *, num_kv_heads, gqa_ratio, head_dim, num_depths, dtype=torch.float64):
    """A random tree of prefix segments and sequences (decode rows and prefill chunks) over a slot pool."""
    num_slots = 4000
    perm = rng.permutation(num_slots)  # slots are scattered, as the page-size-1 pool leaves them
    next_slot = 0

    def take(n):
        nonlocal next_slot
        out = perm[next_slot : next_slot + n].tolist()
        next_slot += n
        return out

    # Each sequence: a chain of prefix nodes (depth 0..d-1), own KV, and q_len rows at the end of it.
    nodes = {}  # (depth, key) → slots
    seqs = []
    num_groups = int(rng.integers(1, 4))
    for g in range(num_groups):
        chain_len = int(rng.integers(0, num_depths + 1))
        for sub in range(int(rng.integers(1, 3))):
            chain = []
            for d in range(chain_len):
                key = (d, g, sub if d == chain_len - 1 and d > 0 else 0)
                if key not in nodes:
                    nodes[key] = take(int(rng.integers(0, 40)) if rng.random() < 0.9 else 0)
                chain.append(key)
            for _ in range(int(rng.integers(1, 5))):
                kv_len = int(rng.integers(0, 30))
                q_len = int(rng.choice([1, 1, kv_len, max(kv_len // 2, 1), kv_len + 2]))
                seqs.append((chain, take(kv_len), q_len))
    num_rows = sum(s[2] for s in seqs)
    q = torch.randn(num_rows, num_kv_heads * gqa_ratio, head_dim, dtype=torch.float64).to(dtype)
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, dtype=torch.float64).to(dtype)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, dtype=torch.float64).to(dtype)
    return q, k_cache, v_cache, nodes, seqs


def _cascade_inputs(nodes, seqs, num_depths):
    """Own metadata over all sequences; per depth, segments = runs of consecutive rows reading one node."""
    q_indptr = np.cumsum([0] + [s[2] for s in seqs])
    own_kv = [s[1] for s in seqs]
    own = dict(
        q_indptr=torch.tensor(q_indptr),
        kv_indices=torch.tensor(sum(own_kv, []), dtype=torch.int64),
        kv_indptr=torch.tensor(np.cumsum([0] + [len(k) for k in own_kv])),
    )
    prefix = []
    for d in range(num_depths):
        runs = []  # [node, first row, num rows]
        for i, (chain, _, q_len) in enumerate(seqs):
            if len(chain) <= d or q_len == 0:
                continue
            if runs and runs[-1][0] == chain[d] and runs[-1][1] + runs[-1][2] == q_indptr[i]:
                runs[-1][2] += q_len
            else:
                runs.append([chain[d], int(q_indptr[i]), q_len])
        if not runs:
            continue
        kv = [nodes[r[0]] for r in runs]
        rows = torch.tensor(np.concatenate([np.arange(r[1], r[1] + r[2]) for r in runs]))
        meta = dict(
            q_start=torch.tensor([r[1] for r in runs]),
            q_len=torch.tensor([r[2] for r in runs]),
            kv_indices=torch.tensor(sum(kv, []), dtype=torch.int64),
            kv_indptr=torch.tensor(np.cumsum([0] + [len(k) for k in kv])),
        )
        prefix.append((meta, rows))
    return own, prefix


def _keys_per_row(nodes, seqs):
    keys = []
    for chain, own_kv, q_len in seqs:
        prefix = sum((nodes[c] for c in chain), [])
        for i in range(q_len):
            keys.append(prefix + own_kv[: max(len(own_kv) - q_len + i + 1, 0)])
    return keys


@pytest.fixture(params=["fused", "matmul"])
def kernel(request, monkeypatch):
    """Both torch paths: the fused CPU flash-attention op, and the unfused matmul fallback."""
    if request.param == "matmul":
        monkeypatch.setattr(torch_backend, "_FUSED_CPU_OP", None)
    elif torch_backend._FUSED_CPU_OP is None:
        pytest.skip("this torch has no fused CPU attention op")
    return request.param


@pytest.mark.parametrize("gqa_ratio", [1, 2, 4])
@pytest.mark.parametrize("num_depths", [1, 2, 3])
def test_cascade_matches_concatenated_kv_float64(gqa_ratio, num_depths, kernel):
    rng = np.random.default_rng(100 * gqa_ratio + num_depths)
    torch.manual_seed(100 * gqa_ratio + num_depths)
    for _ in range(6):
        num_kv_heads, head_dim = int(rng.integers(1, 3)), int(rng.choice([8, 16]))
        q, k_cache, v_cache, nodes, seqs = _random_cascade(
            rng, num_kv_heads=num_kv_heads, gqa_ratio=gqa_ratio, head_dim=head_dim, num_depths=num_depths
        )
        sm_scale = head_dim**-0.5
        own, prefix = _cascade_inputs(nodes, seqs, num_depths)
        o, lse = own_attention(q, k_cache, v_cache, sm_scale=sm_scale, **own)
        for meta, rows in prefix:
            o_p, lse_p = prefix_attention(q, k_cache, v_cache, sm_scale=sm_scale, **meta)
            assert o_p.shape[0] == len(rows)
            attn.merge_state_into(o, lse, o_p, lse_p, rows=rows)
        o_ref, lse_ref = _reference(q, k_cache, v_cache, _keys_per_row(nodes, seqs), sm_scale)
        assert not torch.isnan(o).any() and not torch.isnan(lse).any()
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
        finite = torch.isfinite(lse_ref)
        torch.testing.assert_close(lse[finite], lse_ref[finite], rtol=0, atol=1e-12)


@pytest.fixture(params=["torch", "cpu"])
def any_backend(request):
    """Every CPU backend; the op's is skipped only where this CPU cannot run it (a failed build fails)."""
    if request.param == "torch":
        return attn.TorchBackend(torch.device("cpu"))
    try:
        return attn.CpuBackend(torch.device("cpu"))
    except cpu_ext.OpUnavailable as e:
        if e.__cause__ is not None:
            raise
        pytest.skip(str(e))


def _host_parts(own, prefix):
    """_cascade_inputs' tensors as the step's host parts."""
    own_part = attn.OwnPart(*(_host(own[k]) for k in ("q_indptr", "kv_indices", "kv_indptr")))
    prefixes = [attn.PrefixPart(*(_host(m[k]) for k in ("q_start", "q_len", "kv_indices", "kv_indptr")))
                for m, _ in prefix]
    return own_part, prefixes


def _assert_state_close(o, lse, o_ref, lse_ref, atol, *, lse_atol=2e-5):
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=atol)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite].double(), lse_ref[finite], rtol=0, atol=lse_atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa_ratio", [1, 3, 4, 7])
def test_every_backend_matches_float64_on_random_steps(any_backend, gqa_ratio, head_dim, dtype):
    """Random ragged steps (rows without own keys, q_len > kv_len, one to three prefix depths): one `attend`
    against float64 attention over the same (rounded) inputs."""
    rng = np.random.default_rng(10 * gqa_ratio + head_dim)
    torch.manual_seed(10 * gqa_ratio + head_dim)
    for num_depths in (1, 2, 3):
        q, k_cache, v_cache, nodes, seqs = _random_cascade(
            rng, num_kv_heads=int(rng.integers(1, 3)), gqa_ratio=gqa_ratio, head_dim=head_dim, num_depths=num_depths
        )
        q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
        own, prefixes = _host_parts(*_cascade_inputs(nodes, seqs, num_depths))
        sm_scale = head_dim**-0.5
        o, lse = _attend(any_backend, q, k_cache, v_cache, own=own, prefixes=prefixes, sm_scale=sm_scale)
        o_ref, lse_ref = _reference(q, k_cache, v_cache, _keys_per_row(nodes, seqs), sm_scale)
        # In bf16 the CPU op's matrix-unit tiles round the probabilities to bf16 before P x V (as flash kernels do):
        # o is then within a few bf16 units; the softmax itself, and so the LSE, stays fp32.
        _assert_state_close(o, lse, o_ref, lse_ref, atol=2e-5 if dtype == torch.float32 else 1e-2)


def test_every_backend_on_one_row_and_rows_no_part_reaches(any_backend):
    torch.manual_seed(5)
    q = torch.randn(5, 4, 64)
    k_cache, v_cache = torch.randn(20, 1, 64), torch.randn(20, 1, 64)
    one = attn.OwnPart(np.array([0, 1]), np.array([3, 4, 5]), np.array([0, 3]))
    o, lse = _attend(any_backend, q[:1], k_cache, v_cache, own=one, sm_scale=0.125)
    _assert_state_close(o, lse, *_reference(q[:1], k_cache, v_cache, [[3, 4, 5]], 0.125), atol=2e-5)
    # A step with no own rows: rows 1-3 read a prefix, rows 0 and 4 nothing.
    part = attn.PrefixPart(np.array([1]), np.array([3]), np.arange(10), np.array([0, 10]))
    o, lse = _attend(any_backend, q, k_cache, v_cache, own=_no_own(), prefixes=[part], sm_scale=0.125)
    keys = [[], *[list(range(10))] * 3, []]
    _assert_state_close(o, lse, *_reference(q, k_cache, v_cache, keys, 0.125), atol=2e-5)
    assert (o[[0, 4]] == 0).all() and torch.isneginf(lse[[0, 4]]).all()


def test_float32_and_bfloat16_pools_are_close_to_float64(kernel):
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    q, k_cache, v_cache, nodes, seqs = _random_cascade(rng, num_kv_heads=2, gqa_ratio=2, head_dim=16, num_depths=2)
    keys = _keys_per_row(nodes, seqs)
    o_ref, _ = _reference(q, k_cache, v_cache, keys, 0.25)
    own, prefix = _cascade_inputs(nodes, seqs, 2)
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        qd, kd, vd = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
        o, lse = own_attention(qd, kd, vd, sm_scale=0.25, **own)
        assert o.dtype == torch.float32 and lse.dtype == torch.float32
        for meta, rows in prefix:
            attn.merge_state_into(o, lse, *prefix_attention(qd, kd, vd, sm_scale=0.25, **meta), rows=rows)
        torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=atol)


def test_chunked_prefill_equals_one_shot():
    """A sequence prefilled in chunks (q rows at the end of a growing KV) equals one causal pass."""
    torch.manual_seed(0)
    q = torch.randn(50, 4, 16, dtype=torch.float64)
    k_cache = torch.randn(60, 2, 16, dtype=torch.float64)
    v_cache = torch.randn(60, 2, 16, dtype=torch.float64)
    slots = torch.randperm(60)[:50]
    whole = own_attention(
        q, k_cache, v_cache, q_indptr=torch.tensor([0, 50]), kv_indices=slots,
        kv_indptr=torch.tensor([0, 50]), sm_scale=0.25,
    )
    # Chunks [0, 13), [13, 30), [30, 50) as three sequences in one call, each seeing the KV up to its end.
    ends = [13, 30, 50]
    kv = torch.cat([slots[:e] for e in ends])
    chunked = own_attention(
        q, k_cache, v_cache, q_indptr=torch.tensor([0, 13, 30, 50]), kv_indices=kv,
        kv_indptr=torch.tensor([0, 13, 43, 93]), sm_scale=0.25,
    )
    torch.testing.assert_close(chunked.o, whole.o, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked.lse, whole.lse, rtol=0, atol=1e-12)


def test_long_causal_segment_is_split_into_blocks(monkeypatch, kernel):
    monkeypatch.setattr(torch_buckets, "Q_BLOCK", 16)
    torch.manual_seed(1)
    q = torch.randn(70, 2, 8, dtype=torch.float64)
    k_cache = torch.randn(100, 1, 8, dtype=torch.float64)
    v_cache = torch.randn(100, 1, 8, dtype=torch.float64)
    slots = list(range(100))
    # Two sequences: 45 rows at the end of 80 keys, 25 rows over 20 keys (the first 5 rows see nothing).
    o, lse = own_attention(
        q, k_cache, v_cache, q_indptr=torch.tensor([0, 45, 70]),
        kv_indices=torch.tensor(slots[:80] + slots[80:100]), kv_indptr=torch.tensor([0, 80, 100]), sm_scale=0.3,
    )
    keys = [slots[: 80 - 45 + i + 1] for i in range(45)] + [slots[80 : 80 + max(20 - 25 + i + 1, 0)] for i in range(25)]
    o_ref, lse_ref = _reference(q, k_cache, v_cache, keys, 0.3)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    assert torch.isinf(lse[45:50]).all() and (o[45:50] == 0).all()
    torch.testing.assert_close(lse[50:], lse_ref[50:], rtol=0, atol=1e-12)


def test_empty_parts_and_merges_never_nan(kernel):
    q = torch.randn(3, 2, 8)
    k_cache = torch.randn(10, 1, 8)
    v_cache = torch.randn(10, 1, 8)
    # A prefix segment with no keys, and a zero-row segment.
    o, lse = prefix_attention(
        q, k_cache, v_cache, q_start=torch.tensor([0, 2]), q_len=torch.tensor([2, 0]),
        kv_indices=torch.tensor([], dtype=torch.int64), kv_indptr=torch.tensor([0, 0, 0]), sm_scale=1.0,
    )
    assert o.shape == (2, 2, 8) and (o == 0).all() and torch.isneginf(lse).all()
    # An own part with no keys at all.
    o2, lse2 = own_attention(
        q, k_cache, v_cache, q_indptr=torch.tensor([0, 3]), kv_indices=torch.tensor([], dtype=torch.int64),
        kv_indptr=torch.tensor([0, 0]), sm_scale=1.0,
    )
    assert (o2 == 0).all() and torch.isneginf(lse2).all()
    # Two empty parts merge to empty; an empty part merged with a full one leaves it unchanged.
    v, s = attn.merge_state(o2, lse2, o2, lse2)
    assert (v == 0).all() and torch.isneginf(s).all()
    full_o, full_lse = torch.randn(3, 2, 8), torch.randn(3, 2)
    v, s = attn.merge_state(full_o, full_lse, o2, lse2)
    assert torch.equal(v, full_o) and torch.equal(s, full_lse)
    attn.merge_state_into(o2, lse2, full_o[:2], full_lse[:2], rows=slice(0, 2))
    assert torch.equal(o2[:2], full_o[:2]) and torch.isneginf(lse2[2]).all()


def test_merge_state_equals_attention_over_the_union():
    torch.manual_seed(3)
    q = torch.randn(4, 4, 8, dtype=torch.float64)
    k_cache = torch.randn(30, 2, 8, dtype=torch.float64)
    v_cache = torch.randn(30, 2, 8, dtype=torch.float64)

    def part(slots):
        return prefix_attention(
            q, k_cache, v_cache, q_start=torch.tensor([0]), q_len=torch.tensor([4]),
            kv_indices=torch.tensor(slots), kv_indptr=torch.tensor([0, len(slots)]), sm_scale=0.5,
        )

    a, b, c = part(list(range(0, 7))), part(list(range(7, 20))), part(list(range(20, 30)))
    whole = part(list(range(30)))
    left = attn.merge_state(*attn.merge_state(*a, *b), *c)
    right = attn.merge_state(*a, *attn.merge_state(*b, *c))
    for merged in (left, right):
        torch.testing.assert_close(merged.o, whole.o, rtol=0, atol=1e-12)
        torch.testing.assert_close(merged.lse, whole.lse, rtol=0, atol=1e-12)


def test_buckets_pad_similar_segments_together_and_split_outliers():
    # 40 decode rows of similar KV length and one long one: the long one gets its own bucket.
    q_indptr = np.arange(42)
    kv_len = np.r_[np.full(40, 50), 5000]
    kv_indptr = np.r_[0, np.cumsum(kv_len)]
    layout = torch_buckets.layout_own(
        q_indptr=q_indptr, kv_indices=np.arange(kv_indptr[-1]), kv_indptr=kv_indptr, gqa_ratio=1,
        device=torch.device("cpu"),
    )
    assert len(layout.buckets) == 2 and not layout.is_direct
    uniform = torch_buckets.layout_own(
        q_indptr=np.arange(5), kv_indices=np.arange(40), kv_indptr=np.arange(0, 41, 10), gqa_ratio=1,
        device=torch.device("cpu"),
    )
    assert len(uniform.buckets) == 1 and uniform.is_direct and uniform.buckets[0].mask is None


def test_select_backend_on_cpu_is_the_op_where_it_builds(monkeypatch):
    """The CPU op where it builds; the torch backend (with a note) where this CPU has no AVX-512."""
    expected = "torch" if torch.backends.cpu.get_cpu_capability() != "AVX512" else "cpu"
    assert attn.select_backend(torch.device("cpu")).name == expected
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpu_ext, "_op", None)
    assert attn.select_backend(torch.device("cpu")).name == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 80, 128])
def test_cpu_op_on_long_segments_matches_float64(dtype, head_dim):
    """The op's tiles and key blocks past one of each: causal segments of hundreds of rows (many query tiles, the
    last block partly visible), a prefix part resumed over 300-700 keys by 1-90 rows, head sizes whose K^T
    packing ends in a part vector (16, 80)."""
    try:
        op = cpu_ext.load_op()
    except cpu_ext.OpUnavailable as e:
        pytest.skip(str(e))
    gen = torch.Generator().manual_seed(head_dim)
    num_kv_heads, gqa_ratio, num_slots = 2, 4, 4000
    perm = torch.randperm(num_slots, generator=gen)
    q_lens, kv_lens = [700, 1, 257, 90, 33], [700, 520, 300, 90, 200]
    prefix_lens = [600, 0, 300, 700, 257]  # one prefix segment per sequence; the second sequence has none
    num_rows = sum(q_lens)
    q = torch.randn(num_rows, num_kv_heads * gqa_ratio, head_dim, generator=gen).to(dtype)
    k_cache = (torch.randn(num_slots, num_kv_heads, head_dim, generator=gen) * 2).to(dtype)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    own_slots, prefix_slots, next_slot = [], [], 0
    for kv_len, prefix_len in zip(kv_lens, prefix_lens, strict=True):
        own_slots.append(perm[next_slot : next_slot + kv_len].tolist())
        prefix_slots.append(perm[next_slot + kv_len : next_slot + kv_len + prefix_len].tolist())
        next_slot += kv_len + prefix_len
    q_start = torch.tensor([0, *np.cumsum(q_lens)[:-1].tolist()])
    sm_scale = head_dim**-0.5
    o = torch.empty(num_rows, num_kv_heads * gqa_ratio, head_dim)
    lse = torch.empty(num_rows, num_kv_heads * gqa_ratio)

    def indptr(lens):
        return torch.tensor([0, *np.cumsum(lens).tolist()])

    op.attention_part_(q, k_cache, v_cache, o, lse, q_start, torch.tensor(q_lens),
                       torch.tensor(sum(own_slots, [])), indptr(kv_lens), True, False, sm_scale)
    has_prefix = [i for i, n in enumerate(prefix_lens) if n]
    op.attention_part_(q, k_cache, v_cache, o, lse, q_start[has_prefix], torch.tensor(q_lens)[has_prefix],
                       torch.tensor(sum(prefix_slots, [])), indptr([prefix_lens[i] for i in has_prefix]),
                       False, True, sm_scale)
    keys = []
    for q_len, own, prefix in zip(q_lens, own_slots, prefix_slots, strict=True):
        keys += [prefix + own[: len(own) - q_len + i + 1] for i in range(q_len)]
    # float64 attention of every row over the whole pool at once, the keys a row may not see masked.
    visible = torch.zeros(num_rows, num_slots, dtype=torch.bool)
    for row, row_keys in enumerate(keys):
        visible[row, row_keys] = True
    k64 = k_cache.double().repeat_interleave(gqa_ratio, dim=1)  # [S, Hq, D]
    scores = torch.einsum("rhd,shd->hrs", q.double(), k64) * sm_scale
    scores.masked_fill_(~visible, -math.inf)
    lse_ref = torch.logsumexp(scores, -1).T  # [R, Hq]
    v64 = v_cache.double().repeat_interleave(gqa_ratio, dim=1)
    o_ref = torch.einsum("hrs,shd->rhd", torch.softmax(scores, -1), v64)
    _assert_state_close(o, lse, o_ref, lse_ref, atol=2e-5 if dtype == torch.float32 else 1e-2)
