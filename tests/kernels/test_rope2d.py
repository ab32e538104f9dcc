import pytest
import torch
from kernel_cases import (CASES, TOL, assert_elementwise_close, assert_nonfinite_as_reference, case_params,
                          dtype_params, generator, needs_gpu, randn, real_case_params, relerr, token_meta_for)

from fused_moonvit.kernels import apply_rope_2d, apply_rope_2d_reference, rope_cos_sin_table

HEADS, HEAD_DIM = 2, 8  # small for the interpreter; the real 16 x 72 runs in its own test


def vllm_freqs(dim, theta=10000):
    return 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))


def vllm_freqs_cis(dim, max_h, max_w):
    """vLLM's Rope2DPosEmb.precomputed_freqs_cis, rewritten: for each frequency i, pair 2i follows the
    column (x) and pair 2i + 1 the row (y)."""
    flat = torch.arange(max_h * max_w).float()
    x_pos, y_pos = flat % max_w, flat // max_w
    freqs = vllm_freqs(dim)
    x_cis = torch.polar(torch.ones(max_h * max_w, dim // 4), torch.outer(x_pos, freqs).float())
    y_cis = torch.polar(torch.ones(max_h * max_w, dim // 4), torch.outer(y_pos, freqs).float())
    return torch.stack([x_cis, y_cis], dim=-1).reshape(max_h, max_w, dim // 2)


def vllm_rope(qkv, items, heads, dim):
    """vLLM's apply_rope on the per-item slices of freqs_cis, every frame of an item at the same angles
    (MoonViT3d): complex multiply in fp32, one rounding. items: (t, h, w) each."""
    n = sum(t * h * w for t, h, w in items)
    if n == 0:
        return qkv[:0]
    max_h, max_w = max(h for _, h, _ in items), max(w for _, _, w in items)
    table = vllm_freqs_cis(dim, max_h, max_w)
    freqs = torch.cat([table[:h, :w].reshape(-1, dim // 2).repeat(t, 1) for t, h, w in items]).to(qkv.device)
    out = qkv[:n].clone()
    for part in (0, 1):
        x = qkv[:n, part * heads * dim : (part + 1) * heads * dim].view(n, heads, dim)
        xc = torch.view_as_complex(x.float().reshape(n, heads, dim // 2, 2))
        rot = torch.view_as_real(xc * freqs[:, None, :]).flatten(-2).to(qkv.dtype)
        out[:, part * heads * dim : (part + 1) * heads * dim] = rot.reshape(n, -1)
    return out


def inputs(case, dtype, device, heads=HEADS, dim=HEAD_DIM):
    gen = generator(case, dtype, heads, dim)
    qkv = randn((case.budget, 3 * heads * dim), gen, dtype, device)
    qkv[case.total :, : 2 * heads * dim] = float("nan")  # padding q and k: whatever the buffer held
    return qkv, token_meta_for(case, device), rope_cos_sin_table(vllm_freqs(dim).to(device))


def exact(qkv, meta, cos_sin, heads=HEADS, dim=HEAD_DIM):
    """The reference without the final rounding to qkv's dtype (fp32 from upcast inputs)."""
    return apply_rope_2d_reference(qkv.float(), meta, cos_sin, heads, dim)


def check_result(out, before, want, case, dtype, heads=HEADS, dim=HEAD_DIM, meta=None, cos_sin=None):
    """`want` is checked by norm; with meta and cos_sin, every element is also checked against the exact
    reference."""
    n, qk = case.total, 2 * heads * dim
    assert torch.equal(out[:, qk:], before[:, qk:]), "v must not be touched"
    assert torch.isfinite(out[:, :qk]).all()
    assert out[n:, :qk].eq(0).all(), "padding q and k must be zero"
    assert relerr(out[:n, :qk], want[:n, :qk]) <= TOL[dtype]
    if meta is not None:
        assert_elementwise_close(out[:, :qk], exact(before, meta, cos_sin, heads, dim)[:, :qk])


@case_params
@dtype_params
def test_matches_reference_and_vllm(case, dtype, device):
    qkv, meta, cos_sin = inputs(case, dtype, device)
    before = qkv.clone()
    want = apply_rope_2d_reference(qkv, meta, cos_sin, HEADS, HEAD_DIM)
    out = apply_rope_2d(qkv, meta, cos_sin, HEADS, HEAD_DIM)
    assert out.data_ptr() == qkv.data_ptr()
    check_result(out, before, want, case, dtype, meta=meta, cos_sin=cos_sin)
    vllm = torch.cat([vllm_rope(before, case.items, HEADS, HEAD_DIM), want[case.total :]])
    check_result(out, before, vllm, case, dtype)


@dtype_params
def test_real_head_config(dtype, device):
    case = CASES["padding"]
    qkv, meta, cos_sin = inputs(case, dtype, device, 16, 72)
    before = qkv.clone()
    out = apply_rope_2d(qkv, meta, cos_sin, 16, 72)
    want = torch.cat([vllm_rope(before, case.items, 16, 72), before[case.total :]])
    check_result(out, before, want, case, dtype, 16, 72)
    check_result(out, before, apply_rope_2d_reference(before, meta, cos_sin, 16, 72), case, dtype, 16, 72,
                 meta=meta, cos_sin=cos_sin)


@dtype_params
def test_nan_and_inf_in_valid_rows_propagate(dtype, device):
    case = CASES["padding"]
    qkv, meta, cos_sin = inputs(case, dtype, device)
    # q and k of tokens at row or column 0 (cos 1, sin 0) and elsewhere; v too, which stays as it is.
    for row, col, value in ((0, 0, float("nan")), (1, 3, float("inf")), (13, 17, -float("inf")),
                            (20, 9, float("nan")), (4, 40, float("nan"))):
        qkv[row, col] = value
    before = qkv.clone()
    out = apply_rope_2d(qkv, meta, cos_sin, HEADS, HEAD_DIM)
    qk = 2 * HEADS * HEAD_DIM
    assert_nonfinite_as_reference(out[:, :qk], exact(before, meta, cos_sin)[:, :qk])
    assert torch.equal(out[:, qk:].isnan(), before[:, qk:].isnan()), "v must not be touched"


@pytest.mark.gpu
@needs_gpu
@real_case_params
def test_real_size(real_case, device):
    qkv, meta, cos_sin = inputs(real_case, torch.bfloat16, device, 16, 72)
    before = qkv.clone()
    out = apply_rope_2d(qkv, meta, cos_sin, 16, 72)
    want = torch.cat([vllm_rope(before, real_case.items, 16, 72), before[real_case.total :]])
    check_result(out, before, want, real_case, torch.bfloat16, 16, 72, meta=meta, cos_sin=cos_sin)


def test_large_positions_use_the_table_exactly(device):
    # Angles up to 511 * f_i: frequencies one ulp off (as a differently written formula gives) move
    # the result by about 4e-6 here.
    case = CASES["side512_w"]
    qkv, meta, cos_sin = inputs(case, torch.float32, device, 1, 72)
    before = qkv.clone()
    apply_rope_2d(qkv, meta, cos_sin, 1, 72)
    assert relerr(qkv[:, :144], vllm_rope(before, case.items, 1, 72)[:, :144]) <= 1e-6


def test_table_matches_vllm_freqs_cis():
    table = rope_cos_sin_table(vllm_freqs(72))
    cis = vllm_freqs_cis(72, 512, 512)
    assert table.shape == (512, 18, 2)
    assert torch.equal(table, torch.view_as_real(cis[0, :, 0::2]))  # pairs 2i: columns
    assert torch.equal(table, torch.view_as_real(cis[:, 0, 1::2]))  # pairs 2i + 1: rows


def test_launcher_rejects_bad_arguments(device):
    qkv, meta, cos_sin = inputs(CASES["one"], torch.float32, device)
    with pytest.raises(ValueError, match=r"qkv must have shape \(\*, 48\), got \(60, 40\)"):
        apply_rope_2d(qkv[:, :40].contiguous(), meta, cos_sin, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="head_dim must be a positive multiple of 4, got 6"):
        apply_rope_2d(qkv, meta, cos_sin, 4, 6)
    with pytest.raises(ValueError, match="cos_sin must cover 512 positions, got 100"):
        apply_rope_2d(qkv, meta, cos_sin[:100], HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match=r"cos_sin must be the \(512, 2, 2\) table that rope_cos_sin_table"):
        apply_rope_2d(qkv, meta, vllm_freqs(HEAD_DIM).to(device), HEADS, HEAD_DIM)
    with pytest.raises(TypeError, match="cos_sin must have dtype"):
        apply_rope_2d(qkv, meta, cos_sin.double(), HEADS, HEAD_DIM)
    with pytest.raises(TypeError, match="token_meta must have dtype"):
        apply_rope_2d(qkv, meta.long(), cos_sin, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="qkv must be contiguous"):
        apply_rope_2d(torch.cat([qkv, qkv], 1)[:, :48], meta, cos_sin, HEADS, HEAD_DIM)
