import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (CASES, TOL, assert_elementwise_close, assert_nonfinite_as_reference, case_params,
                          dtype_params, generator, needs_gpu, randn, real_case_params, relerr, token_meta_for)

from fused_moonvit.kernels import interp_pos_embed, interp_pos_embed_reference

C = 8  # few channels keep the interpreter fast
C_ODD = 100  # not a power of two: the channel mask, and two channel blocks in one program when interpreted


def vllm_pos_embed(x, table, items, time=None, mode="bicubic"):
    """What vLLM does: interpolate the table per item (fp32 accumulation, one rounding to the table's
    dtype, as the CUDA kernel does for bf16; the table itself at its own size), flatten row-major, repeat
    it for each frame of a chunk plus that frame's time row (t > 1 only), add to the patch embedding.
    items: (t, h, w) each."""
    pes = []
    for t, h, w in items:
        if (h, w) == tuple(table.shape[:2]):
            pe = table.reshape(h * w, -1)
        else:
            pe = F.interpolate(table.float().permute(2, 0, 1)[None], size=(h, w), mode=mode, align_corners=False)
            pe = pe[0].permute(1, 2, 0).reshape(h * w, -1).to(table.dtype)
        if t > 1:
            pe = (pe.float()[None] + time[:t, None].to(pe.device)).flatten(0, 1)
        pes.append(pe.float())
    n = sum(t * h * w for t, h, w in items)
    return (x[:n].float() + torch.cat(pes)).to(x.dtype) if pes else x[:0]


# The kernel rounds once; vLLM also rounds the interpolated table and the bias sum to bf16 first, so in
# bf16 the two are one rounding (2 ** -8 relative) apart, while fp32 has nothing to round.
VLLM_TOL = {torch.float32: TOL[torch.float32], torch.bfloat16: 2.0 ** -8}


def inputs(case, dtype, device, channels=C):
    gen = generator(case, dtype, channels)
    x = randn((case.budget, channels), gen, dtype, device)
    x[case.total :] = float("nan")  # padding rows: whatever the static buffer held
    table = randn((64, 64, channels), gen, dtype, device)
    return x, table, token_meta_for(case, device)


def time_table(channels, device, frames=4):
    """A random fp32 (frames, C) time table: any values must land where the frames say, not just the
    sinusoid's."""
    return randn((frames, channels), generator("time", channels), torch.float32, device)


def exact(x, table, meta, bias=None, **kwargs):
    """The reference without the final rounding to x's dtype (fp32 from upcast inputs)."""
    return interp_pos_embed_reference(x.float(), table.float(), meta, None if bias is None else bias.float(),
                                      **kwargs)


def check_result(out, x, table, meta, case, dtype, bias=None, **kwargs):
    n = case.total
    assert torch.isfinite(out).all(), "NaN or inf left in the output"
    assert out[n:].eq(0).all(), "padding rows must be zero"
    assert_elementwise_close(out, exact(x, table, meta, bias, **kwargs))
    assert relerr(out[:n], interp_pos_embed_reference(x, table, meta, bias, **kwargs)[:n]) <= TOL[dtype]


@case_params
@dtype_params
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_matches_reference_and_vllm(case, dtype, mode, device):
    x, table, meta = inputs(case, dtype, device)
    time = time_table(C, device)
    out = interp_pos_embed(x, table, meta, out=torch.full_like(x, float("nan")), time_table=time, mode=mode)
    check_result(out, x, table, meta, case, dtype, time_table=time, mode=mode)
    if case.grids:
        want = vllm_pos_embed(x, table, case.items, time, mode)
        assert relerr(out[: case.total], want) <= VLLM_TOL[dtype]


@pytest.mark.parametrize("frames", [4, 2], ids=["whole_table", "short_table"])
def test_time_embedding_reaches_chunk_frames_only(frames, device):
    """Images (t = 1) add no time row, frame f of a chunk adds row f (row 0 too), padding stays zero; a
    table shorter than a chunk (which the encoder refuses earlier) is never read past its end."""
    case = CASES["video_mix"]
    x, table, meta = inputs(case, torch.float32, device)
    time = time_table(C, device, frames)
    with_time = interp_pos_embed(x, table, meta, out=torch.empty_like(x), time_table=time)
    without = interp_pos_embed(x, table, meta, out=torch.empty_like(x))
    added = []
    for t, h, w in case.items:
        added += [time[f] if 1 < t and f < frames else torch.zeros(C, device=device)
                  for f in range(t) for _ in range(h * w)]
    torch.testing.assert_close(with_time[: case.total] - without[: case.total], torch.stack(added),
                               rtol=0, atol=2e-6)
    assert with_time[case.total :].eq(0).all()
    want = exact(x, table, meta, time_table=time)
    assert_elementwise_close(with_time, want)


def test_identity_at_table_size_is_exact(device):
    case = CASES["identity64"]
    x, table, meta = inputs(case, torch.float32, device)
    out = interp_pos_embed(x.clone(), table, meta)
    assert torch.equal(out, x + table.reshape(-1, C))


@dtype_params
def test_in_place_with_bias_and_odd_channels(dtype, device):
    case = CASES["padding"]
    x, table, meta = inputs(case, dtype, device, C_ODD)
    bias = randn((C_ODD,), generator("bias", dtype), dtype, device)
    x0 = x.clone()
    out = interp_pos_embed(x, table, meta, bias)
    assert out.data_ptr() == x.data_ptr()
    check_result(out, x0, table, meta, case, dtype, bias)
    n = case.total
    # vLLM's patch projection adds the bias itself and rounds once before the position embedding.
    want_vllm = vllm_pos_embed((x0[:n].float() + bias.float()).to(dtype), table, case.items)
    assert relerr(out[:n], want_vllm) <= VLLM_TOL[dtype]


def test_fp32_table_with_bf16_activations(device):
    case = CASES["many"]
    x, table, meta = inputs(case, torch.bfloat16, device)
    table = table.float()
    out = interp_pos_embed(x, table, meta, out=torch.full_like(x, float("nan")))
    check_result(out, x, table, meta, case, torch.bfloat16)


@dtype_params
def test_nan_and_inf_in_valid_rows_propagate(dtype, device):
    case = CASES["padding"]
    x, table, meta = inputs(case, dtype, device)
    bias = randn((C,), generator("bias", dtype), dtype, device)
    for row, col, value in ((0, 1, float("nan")), (5, 3, float("inf")), (7, 2, -float("inf")), (9, 0, float("nan"))):
        x[row, col] = value
    # A tap of the first image's top rows, with nonzero weights, in an fp32 table so that the NaN keeps
    # the GPU's bit pattern (0x7FFFFFFF): rounding it to bf16 by adding to the bits would carry into the
    # sign and give -0.0.
    table = table.float()
    table[7, 5, 4] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    out = interp_pos_embed(x, table, meta, bias, out=torch.full_like(x, 0.5))
    want = exact(x, table, meta, bias)
    assert (~torch.isfinite(want[: case.total])).sum() > 4, "the poisoned table entry must reach some token"
    assert_nonfinite_as_reference(out, want)
    assert out[case.total :].eq(0).all()


@pytest.mark.gpu
@needs_gpu
@real_case_params
def test_real_size(real_case, device):
    x, table, meta = inputs(real_case, torch.bfloat16, device, 1152)
    out = interp_pos_embed(x, table, meta, out=torch.full_like(x, float("nan")))
    check_result(out, x, table, meta, real_case, torch.bfloat16)
    assert relerr(out[: real_case.total], vllm_pos_embed(x, table, real_case.items)) <= VLLM_TOL[torch.bfloat16]


def test_launcher_rejects_bad_arguments(device):
    case = CASES["one"]
    x, table, meta = inputs(case, torch.float32, device)
    with pytest.raises(TypeError, match="x must have dtype"):
        interp_pos_embed(x.int(), table, meta)
    with pytest.raises(ValueError, match=r"pos_table must have shape \(\*, \*, 8\), got \(64, 64, 4\)"):
        interp_pos_embed(x, table[..., :4].contiguous(), meta)
    with pytest.raises(ValueError, match=r"token_meta must have shape \(10, 60\)"):
        interp_pos_embed(x, table, meta[:, :32])
    with pytest.raises(ValueError, match="x must be contiguous"):
        interp_pos_embed(x.t().contiguous().t(), table, meta)
    with pytest.raises(TypeError, match="out must have dtype"):
        interp_pos_embed(x, table, meta, out=torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        interp_pos_embed(x, table, meta, bias=torch.zeros(9, device=device))
    with pytest.raises(TypeError, match="time_table must have dtype torch.float32"):
        interp_pos_embed(x, table, meta, time_table=torch.zeros(4, 8, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"time_table must have shape \(\*, 8\)"):
        interp_pos_embed(x, table, meta, time_table=torch.zeros(4, 6, device=device))
    with pytest.raises(ValueError, match="mode must be one of \\('bicubic', 'bilinear'\\), got 'nearest'"):
        interp_pos_embed(x, table, meta, mode="nearest")
    if device.type == "cuda":
        with pytest.raises(ValueError, match="token_meta must be on cuda"):
            interp_pos_embed(x, table, meta.cpu())
