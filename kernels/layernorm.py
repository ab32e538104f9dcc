"""Residual add and LayerNorm (or RMSNorm) in one pass: r = x + y (+ bias), stored back into x;
out = LayerNorm(r).

In a pre-norm block every residual add is followed by a LayerNorm of its result. Unfused, the output
projection adds its bias and rounds, the add reads x and that result and rounds again, and the norm reads
the sum once more. Here the projection runs without its bias, and one kernel reads x and y once, forms
x + y + bias in fp32 and rounds once (the residual stream, written back in place), and normalises that
stored value: `F.layer_norm` semantics (biased variance, eps inside the square root), statistics in
fp32, affine in fp32, one rounding of the output. Without y it is a plain LayerNorm.

RMSNorm (Kimi-K3's MoonViT3d) is `torch.nn.functional.rms_norm`: x / sqrt(mean(x^2) + eps) * weight,
statistics in fp32, no bias.

Each program normalises whole rows held in registers, so the statistics need no second pass over
memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor, next_pow2
from ._rounding import round_to
from .launch import launch_settings
from .limits import check_int

# Launch settings (see kernels/launch.py), unless a `LayerNormConfig` is given. On the GPU, one row per
# program with 4 warps. The interpreter pays per program, so there a program takes as many whole rows as
# fit in `elements_per_program`, whatever the config says.
LAYER_NORM_LAUNCH = [
    {"device_class": "cpu", "elements_per_program": 16384, "num_warps": 4},
    {"device_class": "sm90", "rows_per_program": 1, "num_warps": 4},
]


@dataclass(frozen=True)
class LayerNormConfig:
    """Launch settings that replace the table's on the GPU (a sweep's candidates)."""

    rows_per_program: int
    num_warps: int

    def __post_init__(self):
        rows = check_int("LayerNormConfig.rows_per_program", self.rows_per_program, 1)
        if rows & (rows - 1):
            raise ValueError(f"LayerNormConfig.rows_per_program must be a power of two, got {rows}")
        check_int("LayerNormConfig.num_warps", self.num_warps, 1)


@triton.jit
def normalize_rows(x, w_ptr, b_ptr, c, c_live, eps, C: tl.constexpr, RMS: tl.constexpr):
    """LayerNorm of each row of the fp32 (rows, BLOCK_C) block x, whose columns past C (c_live False) are
    zeros: mean and biased variance in fp32, eps inside the square root, then the (C,) weight and bias.
    With RMS, RMSNorm: the mean square instead of the variance, no centring, no bias."""
    w = tl.load(w_ptr + c, mask=c_live, other=0.0).to(tl.float32)
    if RMS:
        rrms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
        return x * rrms[:, None] * w[None, :]
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(c_live[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    b = tl.load(b_ptr + c, mask=c_live, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _add_layer_norm_kernel(
    x_ptr, y_ptr, bias_ptr, w_ptr, b_ptr, out_ptr, num_rows, eps,
    C: tl.constexpr, HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    c_live = c < C
    live = (r < num_rows)[:, None] & c_live[None, :]
    offs = r.to(tl.int64)[:, None] * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    if HAS_Y:
        x += tl.load(y_ptr + offs, mask=live, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + c, mask=c_live, other=0.0).to(tl.float32)[None, :]
        # The residual stream is what is stored; the norm reads back exactly that.
        stored = round_to(x, x_ptr.dtype.element_ty)
        tl.store(x_ptr + offs, stored, mask=live)
        x = stored.to(tl.float32)
    y = normalize_rows(x, w_ptr, b_ptr, c, c_live, eps, C, RMS)
    tl.store(out_ptr + offs, round_to(y, out_ptr.dtype.element_ty), mask=live)


def _check(x, y, bias, weight, ln_bias, out, rms):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None))
    rows, channels = x.shape
    dev = x.device
    if y is not None:
        check_tensor("y", y, dtypes=(x.dtype,), shape=(rows, channels), device=dev)
    elif bias is not None:
        raise ValueError("bias is added with y; give y too, or fold the bias into x")
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, shape=(channels,), device=dev)
    if rms and ln_bias is not None:
        raise ValueError("an RMSNorm has no bias: ln_bias must be None with rms=True")
    if not rms:
        check_tensor("ln_bias", ln_bias, dtypes=FLOAT_DTYPES, shape=(channels,), device=dev)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, shape=(channels,), device=dev)
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=(rows, channels), device=dev)
        if out.data_ptr() == x.data_ptr():
            raise ValueError("out must not be x: x receives the residual stream")


def add_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    eps: float,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: LayerNormConfig | None = None,
    rms: bool = False,
) -> torch.Tensor:
    """x += y + bias (in place, rounded once), then returns LayerNorm(x) (a new tensor, or `out`); with
    rms, RMSNorm(x) (which has no bias: ln_bias None).

    x: (N, C) residual stream, fp32/bf16/fp16, contiguous; updated in place when y is given.
    y: (N, C) of x's dtype (a projection's output without its bias), or None for a plain LayerNorm of x.
    weight, ln_bias: (C,) the norm's affine parameters (an RMSNorm's weight alone, ln_bias None).
    eps: the norm's epsilon.
    bias: optional (C,) added with y (the projection's bias).
    config: rows per program and warps, instead of `LAYER_NORM_LAUNCH`'s (the interpreter takes its warps).
    """
    _check(x, y, bias, weight, ln_bias, out, rms)
    rows, channels = x.shape
    if out is None:
        out = torch.empty_like(x)
    launch = launch_settings(LAYER_NORM_LAUNCH, _add_layer_norm_kernel, x.device, channels=channels)
    num_warps = config.num_warps if config else launch["num_warps"]
    block_c = next_pow2(channels)
    if "elements_per_program" in launch:
        block_r = max(1, launch["elements_per_program"] // block_c)
    else:
        block_r = config.rows_per_program if config else launch["rows_per_program"]
    _add_layer_norm_kernel[(triton.cdiv(rows, block_r),)](
        x, x if y is None else y, x if bias is None else bias, weight, weight if ln_bias is None else ln_bias,
        out, rows, eps,
        C=channels, HAS_Y=y is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def add_layer_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    eps: float,
    bias: torch.Tensor | None = None,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch `add_layer_norm`, without side effects: (new residual, normalised), each rounded once
    to x's dtype from an fp64 computation (the norm of the rounded residual)."""
    _check(x, y, bias, weight, ln_bias, None, rms)
    r = x.double()
    if y is not None:
        r = r + y.double() + (0.0 if bias is None else bias.double())
    residual = r.to(x.dtype)
    if rms:
        out = torch.nn.functional.rms_norm(residual.double(), (x.shape[1],), weight.double(), eps)
    else:
        out = torch.nn.functional.layer_norm(residual.double(), (x.shape[1],), weight.double(), ln_bias.double(), eps)
    return residual, out.to(x.dtype)
