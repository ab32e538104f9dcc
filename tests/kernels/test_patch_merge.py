import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (CASES, TOL, assert_elementwise_close, assert_nonfinite_as_reference, case_params,
                          dtype_params, generator, needs_gpu, randn, real_case_params, relerr, token_meta_for)

from fused_moonvit.kernels import merge_patches, merge_patches_reference

C = 8
C_ODD = 100


def vllm_merge(x, items, weight, bias):
    """vLLM's patch merger (per item: the mean over its frames, then view/permute) followed by the
    projector's pre_norm and view. items: (t, h, w) each."""
    parts, start = [], 0
    for t, h, w in items:
        seq = x[start : start + t * h * w].view(t, h // 2, 2, w // 2, 2, -1).mean(dim=0).permute(0, 2, 1, 3, 4)
        parts.append(seq.reshape((h // 2) * (w // 2), 4, -1))
        start += t * h * w
    if not parts:
        return x[:0].view(0, 4 * x.shape[1])
    merged = torch.cat(parts)
    if weight is not None:
        merged = F.layer_norm(merged, (x.shape[1],), weight, bias, 1e-5)
    return merged.view(merged.shape[0], -1)


def inputs(case, dtype, device, channels=C):
    gen = generator(case, dtype, channels)
    x = randn((case.budget, channels), gen, dtype, device) * 3 + 1
    x[case.total :] = float("nan")
    weight = randn((channels,), gen, dtype, device)
    bias = randn((channels,), gen, dtype, device)
    return x, token_meta_for(case, device), weight, bias


MAX_FRAMES = 4  # the kernel cases' chunks have up to 4 frames, as Kimi-K2.5's


def exact(x, meta, weight=None, bias=None):
    """The reference without the final rounding to x's dtype (fp32 from upcast inputs)."""
    upcast = [None if t is None else t.float() for t in (weight, bias)]
    return merge_patches_reference(x.float(), meta, *upcast, max_frames=MAX_FRAMES)


def check_result(out, want, case, dtype, exact_want=None, tol=None):
    n = case.outputs
    assert out.shape == (case.budget // 4, want.shape[1])
    assert torch.isfinite(out).all(), "NaN or inf left in the output"
    assert out[n:].eq(0).all(), "padding rows must be zero"
    assert relerr(out[:n], want[:n]) <= (tol or TOL[dtype])
    if exact_want is not None:
        assert_elementwise_close(out, exact_want)


@case_params
@dtype_params
def test_matches_reference_and_vllm(case, dtype, device):
    x, meta, weight, bias = inputs(case, dtype, device)
    out = torch.full((case.budget // 4, 4 * C), float("nan"), dtype=dtype, device=device)
    merge_patches(x, meta, weight, bias, out=out, max_frames=MAX_FRAMES)
    want = merge_patches_reference(x, meta, weight, bias, max_frames=MAX_FRAMES)
    check_result(out, want, case, dtype, exact(x, meta, weight, bias))
    if case.grids:
        # vLLM rounds a chunk's frame mean to x's dtype before the norm, which the kernel keeps in fp32:
        # one more rounding (2 ** -8 relative in bf16) where the item has frames.
        tol = 2.0**-8 if dtype == torch.bfloat16 and any(t > 1 for t, _, _ in case.items) else None
        check_result(out, vllm_merge(x, case.items, weight, bias), case, dtype, tol=tol)


@pytest.mark.parametrize("max_frames", [1, 2])
def test_frames_past_max_frames_are_not_read(max_frames, device):
    """A launcher told max_frames reads and averages an item's first min(t, max_frames) frames: the bound
    is what the kernel loops to, and the mean is over what it read."""
    case = CASES["video_mix"]
    x, meta, weight, bias = inputs(case, torch.float32, device)
    out = merge_patches(x, meta, weight, bias, max_frames=max_frames)
    starts = [sum(t * h * w for t, h, w in case.items[:i]) for i in range(len(case.items))]
    kept = [(min(t, max_frames), h, w) for t, h, w in case.items]
    first_frames = torch.cat([x[s : s + k * h * w] for s, (k, h, w) in zip(starts, kept)])
    n = case.outputs
    assert_elementwise_close(out[:n], vllm_merge(first_frames, kept, weight, bias))
    all_frames = merge_patches(x, meta, weight, bias, max_frames=MAX_FRAMES)
    assert relerr(out[:n], all_frames[:n]) > 0.1, "the chunks' other frames must change the mean"
    ref = merge_patches_reference(x, meta, weight, bias, max_frames=max_frames)
    assert_elementwise_close(out, ref)


@dtype_params
def test_odd_channel_count(dtype, device):
    case = CASES["many"]
    x, meta, weight, bias = inputs(case, dtype, device, C_ODD)
    out = merge_patches(x, meta, weight, bias)
    check_result(out, vllm_merge(x, case.items, weight, bias), case, dtype, exact(x, meta, weight, bias))


@dtype_params
def test_plain_merge_without_norm(dtype, device):
    case = CASES["padding"]
    x, meta, _, _ = inputs(case, dtype, device)
    out = merge_patches(x, meta)
    check_result(out, merge_patches_reference(x, meta), case, dtype, exact(x, meta))
    assert torch.equal(out[: case.outputs], vllm_merge(x, case.items, None, None))


@dtype_params
@pytest.mark.parametrize("norm", [True, False], ids=["prenorm", "plain"])
@pytest.mark.parametrize("name", ["padding", "video_mix"])
def test_nan_and_inf_in_valid_rows_propagate(dtype, norm, name, device):
    case = CASES[name]
    x, meta, weight, bias = inputs(case, dtype, device)
    if not norm:
        weight = bias = None
    poison = [(0, 1, float("nan")), (5, 3, float("inf")), (25, 0, -float("inf"))]
    if name == "video_mix":
        poison.append((43, 2, float("nan")))  # frame 2 of the 3-frame chunk: its mean must be NaN
    for row, col, value in poison:
        x[row, col] = value
    out = merge_patches(x, meta, weight, bias, max_frames=MAX_FRAMES,
                        out=torch.full((case.budget // 4, 4 * C), 0.5, dtype=dtype, device=device))
    want = exact(x, meta, weight, bias)
    assert_nonfinite_as_reference(out, want)
    assert out[case.outputs :].eq(0).all()


@pytest.mark.gpu
@needs_gpu
@real_case_params
def test_real_size(real_case, device):
    x, meta, weight, bias = inputs(real_case, torch.bfloat16, device, 1152)
    out = torch.full((real_case.budget // 4, 4 * 1152), float("nan"), dtype=torch.bfloat16, device=device)
    merge_patches(x, meta, weight, bias, out=out)
    check_result(out, vllm_merge(x, real_case.items, weight, bias), real_case, torch.bfloat16,
                 exact(x, meta, weight, bias))


def test_launcher_rejects_bad_arguments(device):
    x, meta, weight, bias = inputs(CASES["one"], torch.float32, device)
    with pytest.raises(ValueError, match="x must have a multiple of 4 rows"):
        merge_patches(x[:58], meta, weight, bias)
    with pytest.raises(ValueError, match=r"ln_weight must have shape \(8,\), got \(4,\)"):
        merge_patches(x, meta, weight[:4], bias)
    with pytest.raises(ValueError, match=r"out must have shape \(15, 32\)"):
        merge_patches(x, meta, weight, bias, out=torch.empty(60, 8, device=device))
    with pytest.raises(ValueError, match="ln_weight and ln_bias must be given together"):
        merge_patches(x, meta, weight)
    with pytest.raises(TypeError, match="ln_bias must have dtype"):
        merge_patches(x, meta, weight, bias.int())
    with pytest.raises(ValueError, match="max_frames must be >= 1, got 0"):
        merge_patches(x, meta, weight, bias, max_frames=0)
