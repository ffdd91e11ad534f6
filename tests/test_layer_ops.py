"""The fused C++ layer ops against a float64 reference and against torch's ops (TorchLayerOps): random shapes
and values, strided views as the model passes them, every dtype; fp32 within a few ulp of torch's, 16-bit
outputs within one rounding of the float64 result."""

from __future__ import annotations

import pytest
import torch

from batchrun import cpu_ext
from batchrun.model.layer_ops import CpuLayerOps, TorchLayerOps, layer_ops_for


@pytest.fixture(scope="module")
def cpu_ops() -> CpuLayerOps:
    try:
        return CpuLayerOps()
    except cpu_ext.OpUnavailable as e:
        pytest.skip(f"the CPU extension is unavailable here: {e}")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Allowed error against float64, relative to the output's scale: fp32 a few ulp; bf16/fp16 one rounding of the
# result (2^-8 / 2^-11 relative) plus the inputs' own rounding of the intermediate products.
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _ulp_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    err = ((actual.double() - expected) / scale).abs().max().item()
    assert err <= TOL[dtype], (dtype, err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_add_rms_norm(cpu_ops: CpuLayerOps, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, width = int(torch.randint(1, 70, (1,), generator=g)), 16 * int(torch.randint(1, 40, (1,), generator=g))
    hidden = (torch.randn(rows, width, generator=g) * 3).to(dtype)
    delta = torch.randn(rows, 2 * width, generator=g).to(dtype)[:, :width]  # a strided view, as a slice would be
    weight = (torch.rand(width, generator=g) + 0.5).to(dtype)
    eps = 1e-5
    residual = hidden.double() + delta.double()
    expected_hidden = residual.to(dtype)  # the in-place add rounds to the dtype, as torch's add_ does
    x = expected_hidden.double()
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()

    ours_hidden = hidden.clone()
    ours = cpu_ops.add_rms_norm(ours_hidden, delta, weight, eps)
    torch_hidden = hidden.clone()
    theirs = TorchLayerOps.add_rms_norm(torch_hidden, delta, weight, eps)
    assert torch.equal(ours_hidden, torch_hidden)
    assert ours.dtype == dtype and ours.shape == (rows, width)
    _ulp_close(ours, expected, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # Without delta: the norm alone, the residual untouched.
    before = hidden.clone()
    alone = cpu_ops.add_rms_norm(hidden, None, weight, eps)
    assert torch.equal(hidden, before)
    h = hidden.double()
    _ulp_close(alone, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_rope_in_place_on_the_qkv_view(cpu_ops: CpuLayerOps, dtype: torch.dtype, head_dim: int) -> None:
    """q|k heads of a fused projection (rows strided by q+k+v), rotated in place; v untouched. fp32 equals
    torch's x * cos + rotate_half(x) * sin bit for bit (the same roundings, no fused multiply-add)."""
    g = torch.Generator().manual_seed(head_dim)
    rows, qk_heads, v_heads = 37, 6, 2
    qkv = torch.randn(rows, (qk_heads + v_heads) * head_dim, generator=g).to(dtype)
    positions = torch.randint(0, 4096, (rows,), generator=g).float()
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)  # [N, D], as llama.rope_tables forms them
    sin_signed = angles.sin()
    sin_signed[:, : head_dim // 2].neg_()
    cos, sin = angles.cos().to(dtype), sin_signed.to(dtype)
    view = qkv[:, : qk_heads * head_dim].view(rows, qk_heads, head_dim)
    expected_torch = TorchLayerOps.rope(view, cos, sin)
    x = view.double()
    rotated = torch.cat((-x[..., head_dim // 2:], x[..., : head_dim // 2]), dim=-1)
    sin_plain = sin.double().clone()
    sin_plain[:, : head_dim // 2].neg_()
    expected = x * cos.double().unsqueeze(1) + rotated * sin_plain.unsqueeze(1)
    v_before = qkv[:, qk_heads * head_dim:].clone()

    out = cpu_ops.rope(view, cos, sin)
    assert out.data_ptr() == view.data_ptr()
    assert torch.equal(qkv[:, qk_heads * head_dim:], v_before)
    _ulp_close(out, expected, dtype)
    if dtype == torch.float32:
        assert torch.equal(out, expected_torch)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(cpu_ops: CpuLayerOps, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    rows, width = 29, 16 * 24
    gate_up = (torch.randn(rows, 2 * width, generator=g) * 4).to(dtype)
    gate_up[0, :16] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 90.0, -90.0, 200.0, -200.0] * 2).to(dtype)
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    ours = cpu_ops.silu_mul(gate_up)
    assert ours.shape == (rows, width) and ours.dtype == dtype
    assert torch.isfinite(ours).all()
    _ulp_close(ours, expected, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, TorchLayerOps.silu_mul(gate_up.clone()), rtol=3e-7, atol=1e-30)


def test_layer_ops_for_chooses_by_device_dtype_and_shape(cpu_ops: CpuLayerOps) -> None:
    cpu = torch.device("cpu")
    shapes = dict(hidden_size=64, intermediate_size=96, head_dim=32)
    assert layer_ops_for(cpu, torch.bfloat16, **shapes).name == "cpu"
    assert layer_ops_for(cpu, torch.float64, **shapes).name == "torch"
    assert layer_ops_for(cpu, torch.float32, **{**shapes, "head_dim": 16}).name == "torch"
    assert layer_ops_for(cpu, torch.float32, **{**shapes, "hidden_size": 40}).name == "torch"
    assert layer_ops_for(torch.device("meta"), torch.float32, **shapes).name == "torch"
