"""The vLLM baseline's RoPE kernel (benchmarks/vllm_rope.py: vLLM 0.34's packed_qk_rope_ contract), fed the
per-call freqs_cis the baseline builds (benchmarks/hostmeta.py), against an fp64 2D RoPE written here from
docs/design.md section 2.3."""

from functools import lru_cache

import pytest
import torch
from kernel_cases import CASES, assert_elementwise_close, generator, randn

from fused_moonvit.benchmarks.hostmeta import call_freqs_cis, rope_table
from fused_moonvit.benchmarks.vllm_rope import packed_qk_rope_, packed_qk_rope_reference

THETA = 10000.0
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                                 ids=["fp32", "bf16", "fp16"])
# (heads, head dim): 6 and 36 pairs fill 8 and 64 lanes, so the lanes past a head's end are masked; 64
# pairs fill them exactly. 16 x 72 is Kimi-VL's and Kimi-K2.5's, 128 Kimi-K3's.
HEADS = pytest.mark.parametrize("heads,dim", [(3, 12), (16, 72), (2, 128)], ids=["3x12", "16x72", "2x128"])


@lru_cache(maxsize=None)
def table(dim):
    return rope_table(dim, THETA)


def positions(items):
    """Row and column of every token, frames of a chunk at the same positions."""
    rows, cols = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for t, h, w in items:
        idx = torch.arange(h * w).repeat(t)
        rows.append(idx // w)
        cols.append(idx % w)
    return torch.cat(rows), torch.cat(cols)


def exact_angles(rows, cols, dim):
    """fp32 angles as section 2.3 defines them: f_i = 1 / theta ** (4 i / D) in fp32, pair 2i turned by
    col * f_i, pair 2i + 1 by row * f_i (head values 4i, 4i+1 follow the column, 4i+2, 4i+3 the row)."""
    f = 1.0 / THETA ** (torch.arange(0, dim // 4, dtype=torch.float32) * 4 / dim)
    angles = torch.empty(rows.numel(), dim // 2, dtype=torch.float32)
    angles[:, 0::2] = cols.float()[:, None] * f
    angles[:, 1::2] = rows.float()[:, None] * f
    return angles


def rotated_fp64(qkv, angles, heads, dim):
    """q and k of the (T, 3 * H * D) buffer turned by `angles` (T, D / 2) in fp64; v as given."""
    x = qkv.double().view(-1, 3, heads, dim // 2, 2).clone()
    cos, sin = angles.double().cos()[:, None, :], angles.double().sin()[:, None, :]
    re, im = x[:, :2, ..., 0].clone(), x[:, :2, ..., 1].clone()
    x[:, :2, ..., 0] = re * cos[:, None] - im * sin[:, None]
    x[:, :2, ..., 1] = re * sin[:, None] + im * cos[:, None]
    return x.view(qkv.shape[0], -1)


def inputs(case, dtype, device, heads, dim, tail=3):
    """The case's qkv and freqs_cis as views of the first `budget` rows of larger buffers whose extra rows
    are NaN. Padding tokens get freqs_cis rows of random angles, as a graph's padding rows hold what an
    earlier call left there; the returned angles are every row's."""
    gen = generator(case, dtype, heads, dim)
    rows, cols = positions(case.items)
    angles = torch.cat([exact_angles(rows, cols, dim),
                        torch.rand(case.budget - case.total, dim // 2, generator=gen) * 500])
    qkv_mem = torch.full((case.budget + tail, 3 * heads * dim), float("nan"), dtype=dtype, device=device)
    qkv_mem[: case.budget] = randn((case.budget, 3 * heads * dim), gen, dtype, device)
    freqs_mem = torch.full((case.budget + tail, dim // 2), float("nan"), dtype=torch.complex64, device=device)
    if case.total:
        freqs_mem[: case.total] = call_freqs_cis(table(dim), case.items).to(device)
    pad = angles[case.total :]
    freqs_mem[case.total : case.budget] = torch.polar(torch.ones_like(pad), pad).to(device)
    return qkv_mem, freqs_mem, angles


def qkv_view(qkv_mem, budget, heads, dim):
    return qkv_mem[:budget].view(budget, 3, heads, dim)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@DTYPES
def test_matches_fp64_rope_in_place(case, dtype, device):
    heads, dim = 2, 8
    qkv_mem, freqs_mem, angles = inputs(case, dtype, device, heads, dim)
    before = qkv_mem.clone()
    qkv = qkv_view(qkv_mem, case.budget, heads, dim)
    out = packed_qk_rope_(qkv, freqs_mem[: case.budget])
    assert out.data_ptr() == qkv_mem.data_ptr()
    check(qkv_mem, before, angles, case.budget, heads, dim)


@HEADS
@DTYPES
def test_head_sizes(heads, dim, dtype, device):
    case = CASES["video_mix"]
    qkv_mem, freqs_mem, angles = inputs(case, dtype, device, heads, dim)
    before = qkv_mem.clone()
    packed_qk_rope_(qkv_view(qkv_mem, case.budget, heads, dim), freqs_mem[: case.budget])
    check(qkv_mem, before, angles, case.budget, heads, dim)


def check(qkv_mem, before, angles, budget, heads, dim):
    """q and k of every row as the fp64 rotation gives them, to one rounding; v and the rows past the
    budget bit for bit as they were."""
    qk = 2 * heads * dim
    assert torch.equal(qkv_mem[:budget, qk:], before[:budget, qk:]), "v must not be touched"
    assert qkv_mem[budget:].isnan().all(), "rows past the tensor must not be written"
    out = qkv_mem[:budget, :qk]
    assert torch.isfinite(out).all(), "q and k must not read past their rows or into NaN memory"
    assert_elementwise_close(out, rotated_fp64(before[:budget].cpu(), angles, heads, dim)[:, :qk])


def test_large_positions(device):
    # Angles up to 511 * f_i, where the table's fp32 angles must be used as they are.
    case = CASES["side512_w"]
    qkv_mem, freqs_mem, angles = inputs(case, torch.float32, device, 1, 72)
    before = qkv_mem.clone()
    packed_qk_rope_(qkv_view(qkv_mem, case.budget, 1, 72), freqs_mem[: case.budget])
    check(qkv_mem, before, angles, case.budget, 1, 72)


@HEADS
def test_reference_function(heads, dim, device):
    case = CASES["padding"]
    qkv_mem, freqs_mem, angles = inputs(case, torch.float32, device, heads, dim)
    got = packed_qk_rope_reference(qkv_view(qkv_mem, case.budget, heads, dim), freqs_mem[: case.budget])
    assert got.data_ptr() != qkv_mem.data_ptr()
    want = rotated_fp64(qkv_mem[: case.budget].cpu(), angles, heads, dim).view(got.shape)
    assert torch.equal(got[:, 2], qkv_mem[: case.budget].view(got.shape)[:, 2])
    assert_elementwise_close(got[:, :2].flatten(1), want[:, :2].flatten(1))


def test_launcher_rejects_bad_arguments(device):
    qkv = torch.zeros(10, 3, 2, 8, device=device)
    freqs = torch.ones(10, 4, dtype=torch.complex64, device=device)
    with pytest.raises(ValueError, match=r"qkv must have shape \(\*, 3, \*, \*\), got \(10, 48\)"):
        packed_qk_rope_(qkv.flatten(1), freqs)
    with pytest.raises(ValueError, match=r"H > 0 heads of an even D > 0, got shape \(10, 3, 2, 7\)"):
        packed_qk_rope_(torch.zeros(10, 3, 2, 7, device=device), freqs)
    with pytest.raises(ValueError, match=r"freqs_cis must have shape \(10, 4\), got \(9, 4\)"):
        packed_qk_rope_(qkv, freqs[:9])
    with pytest.raises(TypeError, match="freqs_cis must have dtype torch.complex64, got torch.float32"):
        packed_qk_rope_(qkv, torch.view_as_real(freqs).flatten(1))
    with pytest.raises(TypeError, match="qkv must have dtype in"):
        packed_qk_rope_(qkv.double(), freqs)
    with pytest.raises(ValueError, match="qkv must be contiguous"):
        packed_qk_rope_(torch.zeros(10, 3, 2, 16, device=device)[..., :8], freqs)
