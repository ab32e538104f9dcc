"""The Triton linear layer (tiles and split-K per call) against an fp64 matmul, and its split-K partial
products summed by the add + LayerNorm kernel."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import dtype_params, generator, needs_gpu, randn

from fused_moonvit.kernels.gemm import GemmConfig, linear, linear_reference
from fused_moonvit.kernels.layernorm import add_layer_norm, add_layer_norm_reference

PAD = 3  # guard rows past the output: poisoned, and must stay so

SMALL = GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1)
SHAPES = {"7x24x40": (7, 24, 40), "33x100x72": (33, 100, 72), "64x16x64": (64, 16, 64), "50x264x48": (50, 264, 48)}


def operands(m, k, n, dtype, device, key):
    gen = generator(m, k, n, dtype, key)
    x = randn((m, k), gen, dtype, device)
    w = randn((n, k), gen, dtype, device) / k**0.5
    b = randn((n,), gen, dtype, device)
    return x, w, b


def assert_matmul_close(got, x, w, b, gelu):
    """Every element within one rounding of the output dtype plus the fp32 accumulation bound
    K * 2^-23 * sum |x w| (x 1.2, GELU's largest slope, after the GELU): exact up to summation order, so
    one wrong row, column or K block fails."""
    want = linear_reference(x, w, b, gelu=gelu)
    k = x.shape[1]
    spread = k * 2.0**-23 * (x.double().abs() @ w.double().abs().t()) * (1.2 if gelu else 1.0)
    mag = want.abs().clamp(min=torch.finfo(torch.float32).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * torch.finfo(got.dtype).eps
    bound = (ulp + spread + 1e-30).cpu()
    err = (got.double() - want).abs().cpu()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{int(bad.sum())} of {got.numel()} off, e.g. at {bad.nonzero()[0].tolist()}: "
                           f"err {err[bad].max().item():.3g}")


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("mode", ["plain", "bias", "bias_gelu"])
@dtype_params
def test_matches_fp64_matmul(shape, mode, dtype, device):
    m, k, n = shape
    x, w, b = operands(m, k, n, dtype, device, mode)
    bias = None if mode == "plain" else b
    buf = torch.full((m + PAD, n), float("nan"), dtype=dtype, device=device)
    got = linear(x, w, bias, gelu=mode == "bias_gelu", config=SMALL, out=buf[:m])
    assert got.data_ptr() == buf.data_ptr()
    assert_matmul_close(got, x, w, bias, mode == "bias_gelu")
    assert buf[m:].isnan().all(), "rows past the output were written"


@pytest.mark.parametrize("split_k", [2, 3, 5])
@dtype_params
def test_split_k_partials_sum_to_the_product(split_k, dtype, device):
    m, k, n = SHAPES["33x100x72"]
    x, w, _ = operands(m, k, n, dtype, device, split_k)
    cfg = GemmConfig(block_m=16, block_n=32, block_k=16, split_k=split_k, group_m=1, num_warps=1, num_stages=1)
    out = torch.full((split_k, m, n), float("nan"), dtype=torch.float32, device=device)
    parts = linear(x, w, config=cfg, out=out)
    assert parts.data_ptr() == out.data_ptr() and parts.dtype == torch.float32
    assert_matmul_close(parts.double().sum(0), x, w, None, False)
    # Each part is the product over its own K range; with 16-deep blocks of K = 100, split 5 leaves one
    # split past K, which must hold zeros.
    per = -(-(-(-k // split_k)) // 16) * 16
    for s in range(split_k):
        lo, hi = min(k, s * per), min(k, (s + 1) * per)
        assert_matmul_close(parts[s], x[:, lo:hi].contiguous(), w[:, lo:hi].contiguous(), None, False)


@dtype_params
def test_add_layer_norm_sums_split_partials(dtype, device):
    m, k, n = 21, 80, 48
    x, w, b = operands(m, k, n, dtype, device, "norm")
    gen = generator("norm-affine")
    resid = randn((m, n), gen, dtype, device)
    ln_w, ln_b = 1 + 0.1 * randn((n,), gen, dtype, device), 0.1 * randn((n,), gen, dtype, device)
    parts = linear(x, w, config=GemmConfig(16, 16, 16, split_k=3, group_m=1, num_warps=1, num_stages=1))
    stream = resid.clone()
    out = add_layer_norm(stream, parts, ln_w, ln_b, 1e-5, bias=b)
    want_stream, want_out = add_layer_norm_reference(resid, parts, ln_w, ln_b, 1e-5, bias=b)
    assert torch.equal(stream, want_stream) or (stream.double() - want_stream.double()).abs().max() <= (
        torch.finfo(dtype).eps * want_stream.double().abs().max())
    ref = F.layer_norm(stream.double(), (n,), ln_w.double(), ln_b.double(), 1e-5)
    assert ((out.double() - ref).norm() / ref.norm()).item() < (1e-6 if dtype == torch.float32 else 1e-2)
    assert ((want_out.double() - ref).norm() / ref.norm()).item() < (1e-6 if dtype == torch.float32 else 1e-2)
    # The sum the stream holds is x + the full product + bias, whatever the split.
    full = resid.double() + linear_reference(x, w, b)
    tol = torch.finfo(dtype).eps * full.abs().max() + k * 2.0**-23 * (x.double().abs() @ w.double().abs().t()).max()
    assert (stream.double() - full).abs().max() <= tol


@dtype_params
def test_nan_stays_in_its_row(dtype, device):
    m, k, n = 12, 32, 40
    x, w, b = operands(m, k, n, dtype, device, "nan")
    x[4, 9] = float("nan")
    for gelu in (False, True):
        got = linear(x, w, b, gelu=gelu, config=SMALL)
        assert got[4].isnan().all(), "a NaN in a row of x must reach every output of that row"
        rest = torch.cat([got[:4], got[5:]])
        assert torch.isfinite(rest).all()
        assert_matmul_close(rest, torch.cat([x[:4], x[5:]]), w, b, gelu)


def test_gelu_saturates_without_nan(device):
    # Pre-activations of +-60 overflow exp(2u) to inf or underflow it to 0: the GELU must give x and 0.
    x = torch.tensor([[1.0], [-1.0]], device=device)
    w = torch.full((3, 1), 60.0, device=device)
    got = linear(x, w, gelu=True, config=SMALL)
    assert torch.equal(got.cpu(), torch.tensor([[60.0] * 3, [0.0] * 3]))


@pytest.mark.parametrize("config", [GemmConfig(64, 64, 64, 1, 8, 4, 3), GemmConfig(64, 128, 64, 1, 8, 4, 4),
                                    GemmConfig(128, 128, 64, 1, 8, 8, 3), GemmConfig(64, 64, 64, 4, 8, 4, 3),
                                    GemmConfig(128, 64, 128, 2, 8, 8, 3)],
                         ids=["64x64", "64x128s4", "128x128w8", "split4", "128x64k128split2"])
@pytest.mark.parametrize("shape", [(256, 1152, 3456), (1000, 4304, 1152), (300, 1152, 4304)],
                         ids=["qkv256", "fc1_1000", "fc0_300"])
@pytest.mark.gpu
@needs_gpu
def test_model_shapes_on_the_gpu(config, shape, device):
    m, k, n = shape
    x, w, b = operands(m, k, n, torch.bfloat16, device, config)
    if config.split_k > 1:
        assert_matmul_close(linear(x, w, config=config).double().sum(0), x, w, None, False)
        return
    buf = torch.full((m + PAD, n), float("nan"), dtype=torch.bfloat16, device=device)
    for bias, gelu in ((None, False), (b, True)):
        got = linear(x, w, bias, gelu=gelu, config=config, out=buf[:m])
        assert_matmul_close(got, x, w, bias, gelu)
        assert buf[m:].isnan().all()


def test_launcher_rejects_bad_arguments(device):
    x, w, b = operands(8, 16, 24, torch.float32, device, "bad")
    with pytest.raises(ValueError, match=r"weight must have shape \(\*, 16\), got \(24, 12\)"):
        linear(x, w[:, :12].contiguous(), config=SMALL)
    with pytest.raises(TypeError, match="weight must have dtype"):
        linear(x, w.double(), config=SMALL)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\), got \(23,\)"):
        linear(x, w, b[:23], config=SMALL)
    with pytest.raises(ValueError, match="split_k=2 writes fp32 partial products"):
        linear(x, w, b, config=GemmConfig(16, 16, 16, split_k=2))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8, 24\), got \(8, 24\)"):
        linear(x, w, config=GemmConfig(16, 16, 16, split_k=2), out=torch.empty(8, 24, device=device))
    with pytest.raises(ValueError, match="GemmConfig.block_n must be a power of two"):
        GemmConfig(block_n=48)
    with pytest.raises(ValueError, match="x must have at least one row"):
        linear(x[:0], w, config=SMALL)
