"""The packed-QKV varlen attention kernel against per-sequence SDPA in fp64."""

import math

import pytest
import torch
from kernel_cases import (CASES, REAL_SIZE, assert_elementwise_close, dtype_params, generator, needs_gpu, randn,
                          relerr)
from kernel_cases import check_attention_output as check

from fused_moonvit.kernels import build_plan, plan_cu_seqlens
from fused_moonvit.kernels.attention import (AttentionConfig, head_split, varlen_attention_fwd,
                                             varlen_attention_reference)

GUARD = 3  # rows past the output that the kernel must not touch


def packed(lengths, heads, head_dim, dtype, device, gen):
    """qkv for sequences of `lengths` (the last is padding), poisoned with NaN in the padding rows."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    qkv = randn((cu[-1], 3 * heads * head_dim), gen, dtype, device)
    qkv[cu[-2]:] = float("nan")
    return qkv, torch.tensor(cu, dtype=torch.int32, device=device)


def run(qkv, cu, heads, head_dim, config=None):
    """The kernel into a NaN-filled buffer with guard rows; returns the output rows."""
    buf = torch.full((qkv.shape[0] + GUARD, heads * head_dim), float("nan"), dtype=qkv.dtype, device=qkv.device)
    out = varlen_attention_fwd(qkv, cu, heads, head_dim, config=config, out=buf[: qkv.shape[0]])
    assert out.data_ptr() == buf.data_ptr()
    assert buf[qkv.shape[0]:].isnan().all(), "the kernel wrote past its output"
    return out


# The interpreter would take minutes over a 4096-row sequence: that one runs on the GPU only.
PLAN_CASES = {k: v for k, v in CASES.items() if torch.cuda.is_available() or v.total <= 1024}


@pytest.mark.parametrize("case", list(PLAN_CASES.values()), ids=list(PLAN_CASES))
@dtype_params
@pytest.mark.parametrize("heads,head_dim", [(2, 8), (1, 72)], ids=["d8", "d72"])
def test_plans(case, dtype, heads, head_dim, device):
    """Every image set of the plan tests: zero-length slots, a trailing padding sequence, all-padding."""
    plan = build_plan(list(case.grids), case.budget, case.max_items)
    cu = plan_cu_seqlens(plan).to(device)
    gen = generator(case, dtype, head_dim)
    qkv = randn((case.budget, 3 * heads * head_dim), gen, dtype, device)
    qkv[case.total:] = float("nan")
    config = None if device.type == "cuda" else AttentionConfig(block_m=128, block_n=128)
    check(run(qkv, cu, heads, head_dim, config), qkv, cu, heads, head_dim)


@pytest.mark.parametrize("lengths", [
    [2, 1, 0, 3, 2, 5],                 # 2-token and shorter sequences, an empty slot, padding last
    [4] * 30 + [0],                     # many 4-token sequences, empty padding
    [0, 0, 0, 11],                      # all padding
    [150, 0, 0, 7],                     # one long sequence with partial last blocks
    [17, 64, 33, 0, 65, 9],
], ids=["tiny", "many4", "all_padding", "long", "mixed"])
@pytest.mark.parametrize("config", [
    AttentionConfig(block_m=16, block_n=16, extra_programs=1),
    AttentionConfig(block_m=32, block_n=64, extra_programs=4),
    AttentionConfig(block_m=64, block_n=32, extra_programs=0),
], ids=["16x16", "32x64", "64x32"])
@dtype_params
def test_random_packings(lengths, config, dtype, device):
    """Fewer programs than tiles (each program then loops over several), partial blocks on both axes."""
    heads, head_dim = 2, 72
    gen = generator(lengths, config, dtype)
    qkv, cu = packed(lengths, heads, head_dim, dtype, device, gen)
    check(run(qkv, cu, heads, head_dim, config), qkv, cu, heads, head_dim)


@pytest.mark.parametrize("head_dim", [16, 24, 64, 128])
def test_other_head_dims(head_dim, device):
    assert head_split(72) == (64, 16) and head_split(8) == (16, 0) and head_split(128) == (128, 0)
    gen = generator(head_dim)
    qkv, cu = packed([9, 40, 3, 6], 2, head_dim, torch.float32, device, gen)
    check(run(qkv, cu, 2, head_dim), qkv, cu, 2, head_dim)


def test_nan_in_a_sequence_stays_in_it(device):
    """A NaN key poisons its own sequence's rows (as exact attention does) and nothing else."""
    heads, head_dim = 1, 72
    qkv, cu = packed([6, 10, 4], heads, head_dim, torch.float32, device, generator("nan"))
    qkv[8, heads * head_dim + 3] = float("nan")  # a key of the second sequence
    out = run(qkv, cu, heads, head_dim)
    assert out[6:16].isnan().all()
    assert torch.isfinite(out[:6]).all() and out[16:].eq(0).all()


def test_inf_in_a_sequence_stays_in_it(device):
    """An infinite query or key makes its sequence's rows non-finite where exact attention does, and leaves
    the other sequences alone."""
    heads, head_dim = 1, 72
    qkv, cu = packed([6, 10, 4], heads, head_dim, torch.float32, device, generator("inf"))
    qkv[2, 5] = float("inf")  # a query of the first sequence
    qkv[9, heads * head_dim + 1] = -float("inf")  # a key of the second
    out = run(qkv, cu, heads, head_dim)
    exact = varlen_attention_reference(qkv, cu, heads, head_dim)
    assert torch.equal(torch.isfinite(out), torch.isfinite(exact))
    assert not torch.isfinite(out[2]).all() and not torch.isfinite(out[6:16]).all()
    assert torch.isfinite(out[16:]).all()


def test_without_a_padding_sequence(device):
    """pad_last=False: the last sequence is an image like the others, attended, not zeroed."""
    heads, head_dim = 2, 72
    qkv, cu = packed([7, 12], heads, head_dim, torch.float32, device, generator("no padding"))
    qkv = torch.randn_like(qkv)  # no NaN rows: every row is real here
    out = varlen_attention_fwd(qkv, cu, heads, head_dim, pad_last=False)
    exact = varlen_attention_reference(qkv, cu, heads, head_dim, pad_last=False)
    assert out[7:].abs().amax() > 0
    assert_elementwise_close(out, exact)


def test_launcher_rejects_bad_arguments(device):
    qkv, cu = packed([4, 4], 2, 8, torch.float32, device, generator("bad"))
    with pytest.raises(ValueError, match=r"qkv must have shape \(\*, 48\), got \(8, 40\)"):
        varlen_attention_fwd(qkv[:, :40].contiguous(), cu, 2, 8)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8, got 12"):
        varlen_attention_fwd(qkv, cu, 2, 12)
    with pytest.raises(TypeError, match="head_dim must be an int, got float 8.0"):
        varlen_attention_fwd(qkv, cu, 2, 8.0)
    with pytest.raises(ValueError, match="AttentionConfig.block_m must be a power of two >= 16 .tl.dot., got 48"):
        AttentionConfig(block_m=48)
    with pytest.raises(ValueError, match="AttentionConfig.block_n must be >= 16, got 8"):
        AttentionConfig(block_n=8)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        varlen_attention_fwd(qkv, cu.long(), 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens must have at least 2 entries"):
        varlen_attention_fwd(qkv, cu[:1], 2, 8)
    with pytest.raises(ValueError, match=r"out must have shape \(8, 16\)"):
        varlen_attention_fwd(qkv, cu, 2, 8, out=torch.empty(8, 8, device=device))
    with pytest.raises(TypeError, match="qkv must have dtype"):
        varlen_attention_fwd(qkv.double(), cu, 2, 8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", [None, AttentionConfig(128, 64, 8, 2), AttentionConfig(32, 32, 4, 2)],
                         ids=["default", "128x64", "32x32"])
def test_real_size_against_flash_attention(config, device):
    """16 heads of 72 over REAL_SIZE's 20 images and padding; FlashAttention-2 on the same inputs is the
    bar for bf16 error."""
    from torch.nn.attention.varlen import varlen_attn

    heads, head_dim = 16, 72
    plan = build_plan(list(REAL_SIZE.grids), REAL_SIZE.budget, REAL_SIZE.max_items)
    cu = plan_cu_seqlens(plan).to(device)
    qkv = randn((REAL_SIZE.budget, 3 * heads * head_dim), generator("real"), torch.bfloat16, device)
    qkv[REAL_SIZE.total:] = float("nan")
    out = run(qkv, cu, heads, head_dim, config)
    check(out, qkv, cu, heads, head_dim)
    exact = varlen_attention_reference(qkv.float(), cu, heads, head_dim)
    q, k, v = qkv.view(-1, 3, heads, head_dim).unbind(1)
    fa2 = varlen_attn(q, k, v, cu, cu, REAL_SIZE.budget, REAL_SIZE.budget).reshape(-1, heads * head_dim)
    n = REAL_SIZE.total
    ours_err, fa2_err = relerr(out[:n], exact[:n]), relerr(fa2[:n], exact[:n])
    print(f"bf16 vs fp32: ours {ours_err:.3e}, FlashAttention-2 {fa2_err:.3e}")
    assert ours_err <= 1.1 * fa2_err
    assert math.isfinite(ours_err)


@pytest.mark.parametrize("first_col", [0, 40, 48])
def test_zero_padding_rows(first_col, device):
    """Only the padding sequence's rows change, and only from first_col on; cu_seqlens is read on the device."""
    from fused_moonvit.kernels.attention import zero_padding_rows

    x = randn((50, 48), generator(first_col), torch.float32, device)
    want = x.clone()
    want[37:, first_col:] = 0
    cu = torch.tensor([0, 20, 20, 37, 50], dtype=torch.int32, device=device)
    assert zero_padding_rows(x, cu, first_col) is x
    assert torch.equal(x, want)
    cu_all = torch.tensor([0, 0, 50], dtype=torch.int32, device=device)  # all padding
    zero_padding_rows(x, cu_all)
    assert x.eq(0).all()
    with pytest.raises(ValueError, match="first_col=49 columns"):
        zero_padding_rows(x, cu, 49)
