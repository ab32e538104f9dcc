"""A linear layer, y = x @ w.T (+ bias) (then tanh GELU), with tile sizes and split-K chosen per budget.

cuBLAS's heuristics are tuned for large problems. At the encoder's small budgets (256 to 1024 rows) its
128-row tiles leave most of the H200's 132 SMs idle: a 256 x 1152 output is 18 tiles of 128 x 128. Here
the tiles are given per call, and the K dimension can be split over `split_k` programs per output tile.

With split-K the kernel does not reduce: it writes the fp32 partial products as (split_k, M, N), and the
consumer sums them. In the encoder that consumer is the residual add + LayerNorm kernel
(`fused_moonvit.kernels.layernorm.add_layer_norm`), which reads its y operand anyway, so splitting costs
no extra launch and the projection is never rounded before the residual add. Without split-K the bias
and the tanh GELU run in fp32 on the accumulator and the output is rounded once.

Rows past M and columns past N are read from wrapped-around indices (valid memory, results discarded)
instead of masked, so only the last K block of a K that is not a multiple of BLOCK_K takes masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_launchable, check_tensor
from ._rounding import dot, round_to
from .limits import check_int

GELU_TANH_SCALE = tl.constexpr(math.sqrt(2.0 / math.pi))


@dataclass(frozen=True)
class GemmConfig:
    """One launch's tiles: BLOCK_M x BLOCK_N outputs per program, BLOCK_K deep steps, K split in split_k."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = check_int(f"GemmConfig.{name}", getattr(self, name), 16)
            if value & (value - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 16 (tl.dot), got {value}")
        for name in ("split_k", "group_m", "num_warps", "num_stages"):
            check_int(f"GemmConfig.{name}", getattr(self, name), 1)


@triton.jit
def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as F.gelu(approximate="tanh"), in fp32.

    tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp overflows to inf, giving 1; underflows to 0,
    giving -1), and NaN stays NaN."""
    u = GELU_TANH_SCALE * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles sweep the columns together, so their x rows and w columns are
    # read from L2 by the whole group.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    x_rows = x_ptr + (rm % M).to(tl.int64)[:, None] * K
    w_cols = w_ptr + (rn % N).to(tl.int64)[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        kk = k + rk
        if EVEN_K:
            a = tl.load(x_rows + kk[None, :])
            b = tl.load(w_cols + kk[:, None])
        else:
            a = tl.load(x_rows + kk[None, :], mask=(kk < k_end)[None, :], other=0.0)
            b = tl.load(w_cols + kk[:, None], mask=(kk < k_end)[:, None], other=0.0)
        acc = dot(a, b, acc)

    live = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT:
        tl.store(out_ptr + tl.program_id(1).to(tl.int64) * M * N + offs, acc, mask=live)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn % N).to(tl.float32)[None, :]
        if GELU:
            acc = gelu_tanh(acc)
        tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty), mask=live)


def _check(x, weight, bias, gelu, config, out):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None))
    rows, k = x.shape
    if rows == 0 or k == 0:
        raise ValueError(f"x must have at least one row and one column, got {tuple(x.shape)}")
    check_tensor("weight", weight, dtypes=(x.dtype,), shape=(None, k), device=x.device)
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, shape=(n,), device=x.device)
    if config.split_k > 1 and (bias is not None or gelu):
        raise ValueError(f"split_k={config.split_k} writes fp32 partial products for the consumer to sum; "
                         f"the bias and GELU belong to that consumer, so give neither here")
    want = (config.split_k, rows, n) if config.split_k > 1 else (rows, n)
    if out is not None:
        dtype = torch.float32 if config.split_k > 1 else x.dtype
        check_tensor("out", out, dtypes=(dtype,), shape=want, device=x.device)
    return rows, k, n


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gelu: bool = False,
           config: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) (then tanh GELU), computed in fp32 and rounded once to x's dtype.

    x: (M, K) fp32/bf16/fp16, contiguous. weight: (N, K) of x's dtype (an nn.Linear's). bias: optional (N,).
    With config.split_k > 1 the result is instead the fp32 (split_k, M, N) partial products, to be summed
    by the caller (add_layer_norm takes them as y); bias and gelu must then be left out.
    """
    cfg = config or GemmConfig()
    rows, k, n = _check(x, weight, bias, gelu, cfg, out)
    split = cfg.split_k > 1
    if out is None:
        out = x.new_empty((cfg.split_k, rows, n) if split else (rows, n),
                          dtype=torch.float32 if split else x.dtype)
    check_launchable(_linear_kernel, x.device)
    # Every split but the last gets a whole number of K blocks (a split past K writes zeros).
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    grid = (triton.cdiv(rows, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _linear_kernel[grid](
        x, weight, weight if bias is None else bias, out, rows, n, k, k_per_split,
        HAS_BIAS=bias is not None, GELU=gelu, SPLIT=split, EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     gelu: bool = False) -> torch.Tensor:
    """`linear` in fp64 without the final rounding: x @ weight.T (+ bias) (then F.gelu(approximate="tanh"))."""
    y = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return torch.nn.functional.gelu(y, approximate="tanh") if gelu else y
