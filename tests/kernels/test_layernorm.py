"""The residual add + LayerNorm (or RMSNorm) kernel against F.layer_norm (F.rms_norm) after an fp64 add."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (assert_elementwise_close, assert_nonfinite_as_reference, dtype_params, generator,
                          needs_gpu, randn)

from fused_moonvit.kernels.layernorm import LayerNormConfig, add_layer_norm, add_layer_norm_reference
from fused_moonvit.moonvit.modules import norm_eps

EPS = 1e-5
PAD = 5  # rows of the buffer past the rows given to the kernel: poisoned, and must stay so


def inputs(rows, channels, dtype, device, key):
    gen = generator(rows, channels, dtype, key)
    buf = torch.full((rows + PAD, channels), float("nan"), dtype=dtype, device=device)
    buf[:rows] = randn((rows, channels), gen, dtype, device) * 2 + 0.5
    y = randn((rows, channels), gen, dtype, device)
    bias = randn((channels,), gen, dtype, device) * 0.1
    weight = 1 + 0.2 * randn((channels,), gen, dtype, device)
    ln_bias = 0.1 * randn((channels,), gen, dtype, device)
    return buf, y, bias, weight, ln_bias


def exact_sum(x, y, bias):
    """x + y + bias in fp64 (what the stored residual rounds)."""
    if y is None:
        return x.double()
    return x.double() + y.double() + (0 if bias is None else bias.double())


def exact_norm(residual, weight, ln_bias):
    """LayerNorm in fp64 of the residual as stored."""
    return F.layer_norm(residual.double(), (residual.shape[1],), weight.double(), ln_bias.double(), EPS)


@pytest.mark.parametrize("rows,channels", [(7, 8), (33, 100), (64, 1152)], ids=["7x8", "33x100", "64x1152"])
@pytest.mark.parametrize("mode", ["add_bias", "add", "plain"])
@dtype_params
def test_matches_layer_norm_after_an_add(rows, channels, mode, dtype, device):
    buf, y, bias, weight, ln_bias = inputs(rows, channels, dtype, device, mode)
    x = buf[:rows]
    x0 = x.clone()
    y_arg = None if mode == "plain" else y
    bias_arg = bias if mode == "add_bias" else None
    out = torch.full_like(x, float("nan"))
    got = add_layer_norm(x, y_arg, weight, ln_bias, EPS, bias=bias_arg, out=out)
    assert got.data_ptr() == out.data_ptr()
    if mode == "plain":
        assert torch.equal(x, x0), "a plain LayerNorm must leave x alone"
    assert_elementwise_close(x, exact_sum(x0, y_arg, bias_arg))
    assert_elementwise_close(out, exact_norm(x, weight, ln_bias))
    assert buf[rows:].isnan().all(), "rows past the input were written"
    # Against F.layer_norm after an fp32 add (one rounding of the sum, as the kernel), in the model's dtype.
    summed = exact_sum(x0.float(), None if y_arg is None else y_arg.float(),
                       None if bias_arg is None else bias_arg.float()).float().to(dtype)
    want = F.layer_norm(summed.float(), (channels,), weight.float(), ln_bias.float(), EPS).to(dtype)
    assert ((out.double() - want.double()).norm() / want.double().norm()).item() <= (1e-6 if dtype == torch.float32
                                                                                     else 1e-2)
    ref_residual, ref_out = add_layer_norm_reference(x0, y_arg, weight, ln_bias, EPS, bias=bias_arg)
    assert_elementwise_close(ref_residual, exact_sum(x0, y_arg, bias_arg))
    assert_elementwise_close(ref_out, exact_norm(ref_residual, weight, ln_bias))


@pytest.mark.parametrize("rows,channels", [(7, 8), (33, 100), (64, 1024)], ids=["7x8", "33x100", "64x1024"])
@pytest.mark.parametrize("mode", ["add", "plain"])
@dtype_params
def test_rms_norm_after_an_add(rows, channels, mode, dtype, device):
    """rms=True: RMSNorm (Kimi-K3's MoonViT3d), with torch's default eps for these activations."""
    buf, y, _, weight, _ = inputs(rows, channels, dtype, device, ("rms", mode))
    eps = norm_eps(torch.nn.RMSNorm(channels), dtype)
    x = buf[:rows]
    x0 = x.clone()
    y_arg = None if mode == "plain" else y
    out = add_layer_norm(x, y_arg, weight, None, eps, out=torch.full_like(x, float("nan")), rms=True)
    assert_elementwise_close(x, exact_sum(x0, y_arg, None))
    assert_elementwise_close(out, F.rms_norm(x.double(), (channels,), weight.double(), eps))
    assert buf[rows:].isnan().all(), "rows past the input were written"
    want = torch.nn.RMSNorm(channels, device=device, dtype=dtype)
    with torch.no_grad():
        want.weight.copy_(weight)
    rel = ((out.double() - want(x).double()).norm() / want(x).double().norm()).item()
    assert rel <= (1e-6 if dtype == torch.float32 else 1e-2), "torch.nn.RMSNorm(eps=None) disagrees"
    ref_residual, ref_out = add_layer_norm_reference(x0, y_arg, weight, None, eps, rms=True)
    assert_elementwise_close(ref_out, F.rms_norm(ref_residual.double(), (channels,), weight.double(), eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_rms_norm_default_eps_is_torchs(dtype, device):
    """torch.nn.RMSNorm(eps=None) on rows whose mean square is near eps, where the eps decides the result:
    the kernel with `norm_eps`'s value matches it (and 2^-7, finfo(bf16).eps, would not)."""
    x = (0.03 * randn((6, 256), generator("eps", dtype), torch.float32, device)).to(dtype)
    weight = torch.ones(256, dtype=dtype, device=device)
    with torch.no_grad():
        want = torch.nn.RMSNorm(256, device=device, dtype=dtype)(x).double()
    got = add_layer_norm(x.clone(), None, weight, None, norm_eps(torch.nn.RMSNorm(256), dtype), rms=True).double()
    assert ((got - want).norm() / want.norm()).item() <= 4 * torch.finfo(dtype).eps
    wrong = F.rms_norm(x.double(), (256,), None, 2.0**-7)
    assert ((wrong - want).norm() / want.norm()).item() > 0.5


@dtype_params
def test_nan_and_inf_stay_in_their_rows(dtype, device):
    buf, y, bias, weight, ln_bias = inputs(12, 40, dtype, device, "nan")
    x = buf[:12]
    y[3, 7] = float("nan")
    x[5, 0] = float("inf")
    x0 = x.clone()
    out = add_layer_norm(x, y, weight, ln_bias, EPS, bias=bias)
    assert_nonfinite_as_reference(x, exact_sum(x0, y, bias))
    assert_nonfinite_as_reference(out, exact_norm(x, weight, ln_bias))
    assert (~torch.isfinite(out[3])).all() and (~torch.isfinite(out[5])).all()


@pytest.mark.parametrize("config", [LayerNormConfig(1, 4), LayerNormConfig(2, 8), LayerNormConfig(4, 8)],
                         ids=["1row", "2rows", "4rows"])
@pytest.mark.gpu
@needs_gpu
def test_real_width_configs(config, device):
    buf, y, bias, weight, ln_bias = inputs(4099, 1152, torch.bfloat16, device, config)
    x = buf[:4099]
    x0 = x.clone()
    out = add_layer_norm(x, y, weight, ln_bias, EPS, bias=bias, config=config)
    assert_elementwise_close(x, exact_sum(x0, y, bias))
    assert_elementwise_close(out, exact_norm(x, weight, ln_bias))
    assert buf[4099:].isnan().all()


def test_launcher_rejects_bad_arguments(device):
    buf, y, bias, weight, ln_bias = inputs(4, 8, torch.float32, device, "bad")
    x = buf[:4]
    with pytest.raises(ValueError, match=r"y must have shape \(4, 8\), got \(4, 6\)"):
        add_layer_norm(x, y[:, :6].contiguous(), weight, ln_bias, EPS)
    with pytest.raises(ValueError, match="bias is added with y"):
        add_layer_norm(x, None, weight, ln_bias, EPS, bias=bias)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
        add_layer_norm(x, y, weight[:7], ln_bias, EPS)
    with pytest.raises(TypeError, match="y must have dtype"):
        add_layer_norm(x, y.double(), weight, ln_bias, EPS)
    with pytest.raises(ValueError, match="out must not be x"):
        add_layer_norm(x, y, weight, ln_bias, EPS, out=x)
    with pytest.raises(TypeError, match="ln_bias must be a torch.Tensor, got NoneType"):
        add_layer_norm(x, y, weight, None, EPS)
    with pytest.raises(ValueError, match="an RMSNorm has no bias: ln_bias must be None with rms=True"):
        add_layer_norm(x, y, weight, ln_bias, EPS, rms=True)
