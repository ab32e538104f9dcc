"""Fused position embedding: out[t] = x[t] (+ bias) + interp(pos_table, h, w)[row, col] (+ time[f]).

MoonVit interpolates its (64, 64, C) position table to each image's (h, w) patch grid with
`F.interpolate(table.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False)` and
adds it to the patch embedding. PyTorch's kernel parallelises over output pixels and loops over the
channels; here each program takes a block of tokens and a run of channel blocks, computes the 4 + 4 taps
and weights of each token once, and gathers 16 table rows per token straight from the table (no
per-image table is materialised anywhere).

Numerics, matching ATen's upsample_bicubic2d (UpSample.h):
  scale = float(in) / out                      (fp32, as area_pixel_compute_scale without a scale factor)
  s = scale * (d + 0.5) - 0.5                  (rounded once to fp32, as a fused multiply-add rounds
                                                it: nvcc contracts ATen's expression so by default, and
                                                it matched the CPU build's F.interpolate more closely
                                                than two roundings; computed exactly in fp64 and
                                                rounded, so the interpreter gives the same bits)
  i = floor(s), t = s - i                      (fp32; negative s is kept, as ATen does for cubic)
  taps i - 1 .. i + 2 clamped to [0, in - 1]
  weights: Keys cubic convolution, A = -0.75, of t + 1, t, 1 - t, 2 - t (arguments in fp32 as ATen
           forms them; the polynomials in fp64, rounded to fp32)
  value = sum_y wy * (sum_x wx * table[y, x])  (fp32, rows first, as ATen)
The identity at in == out is exact: s = d, t = 0, weights (0, 1, 0, 0).

Bilinear (MoonViT3d of Kimi-K3), matching ATen's upsample_bilinear2d without align_corners:
  s = max(scale * (d + 0.5) - 0.5, 0)          (fp32 as above; bilinear clamps the source at 0)
  i = floor(s), i' = min(i + 1, in - 1), t = s - i; weights 1 - t and t; rows first, as ATen.
It takes the bicubic path's 4-tap structure with the outer weights zero, whose taps are never loaded.

Time (MoonViT3d's video chunks): a token of frame f of an item of t > 1 frames also gets row f of the
fixed fp32 (T0, C) time table, added in fp32 with the rest; an image (t = 1) gets none, as in vLLM and
transformers. The plan's META_TIME row says which (0: none, f + 1: row f).

Precision of the sum: x (+ bias) + embedding is formed in fp32 and rounded once to x's dtype. vLLM
rounds twice more (the interpolated table to bf16, and the projection's bias sum): every rounding at the
input is carried through all 27 layers, and dropping them is what keeps the fused encoder's bf16 error
at or under the bf16 reference's. The result is within one rounding of vLLM's.

Padding tokens (image -1) are written as zeros, whatever x held there, so every later layer sees finite
padding rows even if the static input buffer was never initialised.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor, next_pow2
from ._rounding import round_to
from .launch import launch_settings
from .plan import META_COL, META_HEIGHT, META_ROW, META_ROWS, META_TIME, META_WIDTH

INTERPOLATIONS = ("bicubic", "bilinear")

# Launch settings (see kernels/launch.py): a program takes `block_tokens` tokens and channel blocks of up
# to `max_block_channels`, all of a token's channel blocks in one program, unless there are fewer token
# blocks than `spread_below_waves` per SM: then each channel block gets its own program, to fill the
# machine (0: never). The interpreter pays per program, so it gets the largest blocks. On the GPU (H200
# sweep), 16 tokens x 128 channels with all channel blocks in one program was fastest from 4096 tokens up.
POS_EMBED_LAUNCH = [
    {"device_class": "cpu", "block_tokens": 1024, "max_block_channels": 64, "spread_below_waves": 0,
     "num_warps": 8},
    {"device_class": "sm90", "block_tokens": 16, "max_block_channels": 128, "spread_below_waves": 2,
     "num_warps": 8},
]


@triton.jit
def _cubic_near(x):
    # Keys kernel for |x| <= 1 with A = -0.75: ((A + 2) x - (A + 3)) x^2 + 1.
    xd = x.to(tl.float64)
    return ((1.25 * xd - 2.25) * xd * xd + 1.0).to(tl.float32)


@triton.jit
def _cubic_far(x):
    # Keys kernel for 1 <= |x| <= 2 with A = -0.75: ((A x - 5A) x + 8A) x - 4A.
    xd = x.to(tl.float64)
    return (((-0.75 * xd + 3.75) * xd - 6.0) * xd + 3.0).to(tl.float32)


@triton.jit
def _axis_taps(pos, out_size, IN_SIZE: tl.constexpr, BICUBIC: tl.constexpr):
    # Source taps and weights of output coordinate `pos` along one axis resized IN_SIZE -> out_size.
    scale = (IN_SIZE / out_size.to(tl.float64)).to(tl.float32)
    src = (scale.to(tl.float64) * (pos.to(tl.float32) + 0.5).to(tl.float64) - 0.5).to(tl.float32)
    if not BICUBIC:
        src = tl.maximum(src, 0.0)
        fl = tl.floor(src)
        t = src - fl
        i = fl.to(tl.int32)
        zero = tl.zeros_like(t)
        i_next = tl.minimum(i + 1, IN_SIZE - 1)
        return i, i, i_next, i_next, zero, 1.0 - t, t, zero
    fl = tl.floor(src)
    t = src - fl
    i = fl.to(tl.int32)
    one_minus_t = 1.0 - t
    w0 = _cubic_far(t + 1.0)
    w1 = _cubic_near(t)
    w2 = _cubic_near(one_minus_t)
    w3 = _cubic_far(one_minus_t + 1.0)
    i0 = tl.minimum(tl.maximum(i - 1, 0), IN_SIZE - 1)
    i1 = tl.minimum(tl.maximum(i, 0), IN_SIZE - 1)
    i2 = tl.minimum(tl.maximum(i + 1, 0), IN_SIZE - 1)
    i3 = tl.minimum(tl.maximum(i + 2, 0), IN_SIZE - 1)
    return i0, i1, i2, i3, w0, w1, w2, w3


@triton.jit
def _table_row(tab_ptr, y, x0, x1, x2, x3, wx0, wx1, wx2, wx3, c, mask, C: tl.constexpr, W0: tl.constexpr):
    # Width pass of one source row y: sum_x wx * table[y, x, c] in fp32, in ATen's order. Taps of zero
    # weight are not loaded: at in == out, 15 of the 16 are zero.
    base = tab_ptr + (y * W0)[:, None] * C + c[None, :]
    acc = wx0[:, None] * tl.load(base + (x0 * C)[:, None], mask=mask & (wx0 != 0)[:, None], other=0.0).to(tl.float32)
    acc += wx1[:, None] * tl.load(base + (x1 * C)[:, None], mask=mask & (wx1 != 0)[:, None], other=0.0).to(tl.float32)
    acc += wx2[:, None] * tl.load(base + (x2 * C)[:, None], mask=mask & (wx2 != 0)[:, None], other=0.0).to(tl.float32)
    acc += wx3[:, None] * tl.load(base + (x3 * C)[:, None], mask=mask & (wx3 != 0)[:, None], other=0.0).to(tl.float32)
    return acc


@triton.jit
def _interp_pos_embed_kernel(
    x_ptr, tab_ptr, bias_ptr, time_ptr, out_ptr, row_ptr, col_ptr, h_ptr, w_ptr, time_idx_ptr, budget,
    C: tl.constexpr, H0: tl.constexpr, W0: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TIME: tl.constexpr,
    T0: tl.constexpr, BICUBIC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr,
):
    # A program takes BLOCK_T tokens and CHUNKS consecutive channel blocks of BLOCK_C, so each token's
    # taps and weights are computed once for all of them.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_live = t < budget
    h = tl.load(h_ptr + t, mask=t_live, other=0)
    w = tl.load(w_ptr + t, mask=t_live, other=0)
    row = tl.load(row_ptr + t, mask=t_live, other=0)
    col = tl.load(col_ptr + t, mask=t_live, other=0)
    valid = h > 0
    y0, y1, y2, y3, wy0, wy1, wy2, wy3 = _axis_taps(row, tl.maximum(h, 1), H0, BICUBIC)
    x0, x1, x2, x3, wx0, wx1, wx2, wx3 = _axis_taps(col, tl.maximum(w, 1), W0, BICUBIC)
    gather_t = t_live & valid
    if HAS_TIME:
        time_row = tl.load(time_idx_ptr + t, mask=t_live, other=0) - 1

    for chunk in range(CHUNKS):
        c = (tl.program_id(1) * CHUNKS + chunk) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_live = c < C
        g = gather_t[:, None] & c_live[None, :]
        pe = wy0[:, None] * _table_row(tab_ptr, y0, x0, x1, x2, x3, wx0, wx1, wx2, wx3, c,
                                       g & (wy0 != 0)[:, None], C, W0)
        pe += wy1[:, None] * _table_row(tab_ptr, y1, x0, x1, x2, x3, wx0, wx1, wx2, wx3, c,
                                        g & (wy1 != 0)[:, None], C, W0)
        pe += wy2[:, None] * _table_row(tab_ptr, y2, x0, x1, x2, x3, wx0, wx1, wx2, wx3, c,
                                        g & (wy2 != 0)[:, None], C, W0)
        pe += wy3[:, None] * _table_row(tab_ptr, y3, x0, x1, x2, x3, wx0, wx1, wx2, wx3, c,
                                        g & (wy3 != 0)[:, None], C, W0)
        if HAS_TIME:
            timed = g & ((time_row >= 0) & (time_row < T0))[:, None]
            pe += tl.load(time_ptr + (tl.maximum(time_row, 0) * C)[:, None] + c[None, :], mask=timed, other=0.0)

        io = t.to(tl.int64)[:, None] * C + c[None, :]
        live = t_live[:, None] & c_live[None, :]
        x = tl.load(x_ptr + io, mask=live, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(bias_ptr + c, mask=c_live, other=0.0).to(tl.float32)
            x += b[None, :]
        y = tl.where(valid[:, None], x + pe, 0.0)
        tl.store(out_ptr + io, round_to(y, out_ptr.dtype.element_ty), mask=live)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(x, pos_table, token_meta, bias, out, time_table, mode):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None))
    budget, channels = x.shape
    dev = x.device
    check_tensor("pos_table", pos_table, dtypes=FLOAT_DTYPES, shape=(None, None, channels), device=dev)
    check_tensor("token_meta", token_meta, dtypes=(torch.int32,), shape=(META_ROWS, budget), device=dev)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, shape=(channels,), device=dev)
    if time_table is not None:
        # fp32 always: it is a fixed sinusoid that vLLM and transformers keep (or compute) unrounded.
        check_tensor("time_table", time_table, dtypes=(torch.float32,), shape=(None, channels), device=dev)
    if mode not in INTERPOLATIONS:
        raise ValueError(f"mode must be one of {INTERPOLATIONS}, got {mode!r}")
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=tuple(x.shape), device=dev)


def interp_pos_embed(
    x: torch.Tensor,
    pos_table: torch.Tensor,
    token_meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    time_table: torch.Tensor | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Add each token's interpolated position embedding (and optionally a bias and its frame's time
    embedding) to x.

    x: (B, C) patch embeddings, fp32/bf16/fp16, contiguous.
    pos_table: (H0, W0, C) position table (64, 64, 1152 for MoonVit), contiguous.
    token_meta: int32 (META_ROWS, B) from `expand_plan`.
    bias: optional (C,) added to x first (the patch projection's bias).
    out: optional (B, C) output of x's dtype; by default x is updated in place.
    time_table: optional fp32 (T0, C) time embedding (MoonViT3d), row f added to frame f of an item of
        more than one frame, as META_TIME says; frames past T0 add nothing (the table is never read past
        its end; the encoder's input checks refuse t > T0 before they get here).
    mode: "bicubic" (MoonVit, Kimi-K2.5) or "bilinear" (Kimi-K3).

    Returns out (or x). Valid rows hold x (+ bias) + embedding; padding rows hold zeros.
    """
    _check(x, pos_table, token_meta, bias, out, time_table, mode)
    if out is None:
        out = x
    budget, channels = x.shape
    h0, w0 = pos_table.shape[:2]
    launch = launch_settings(POS_EMBED_LAUNCH, _interp_pos_embed_kernel, x.device, channels=channels)
    block_t = launch["block_tokens"]
    block_c = min(next_pow2(channels), launch["max_block_channels"])
    token_blocks, chunks = triton.cdiv(budget, block_t), triton.cdiv(channels, block_c)
    waves = launch["spread_below_waves"]
    if waves and token_blocks < waves * _sm_count(x.device):
        chunks = 1
    _interp_pos_embed_kernel[(token_blocks, triton.cdiv(triton.cdiv(channels, block_c), chunks))](
        x, pos_table, x if bias is None else bias, pos_table if time_table is None else time_table, out,
        token_meta[META_ROW], token_meta[META_COL], token_meta[META_HEIGHT], token_meta[META_WIDTH],
        token_meta[META_TIME], budget,
        C=channels, H0=h0, W0=w0, HAS_BIAS=bias is not None, HAS_TIME=time_table is not None,
        T0=1 if time_table is None else time_table.shape[0], BICUBIC=mode == "bicubic", BLOCK_T=block_t, BLOCK_C=block_c, CHUNKS=chunks,
        num_warps=launch["num_warps"],
    )
    return out


def _axis_taps_reference(pos: torch.Tensor, out_size: torch.Tensor, in_size: int, mode: str):
    scale = (in_size / out_size.double()).float()
    src = (scale.double() * (pos.float() + 0.5).double() - 0.5).float()
    if mode == "bilinear":
        src = src.clamp(min=0)
        fl = torch.floor(src)
        t = src - fl
        taps = torch.stack([fl.long(), (fl.long() + 1).clamp(max=in_size - 1)], dim=1)
        return taps, torch.stack([1.0 - t, t], dim=1)
    fl = torch.floor(src)
    t = src - fl
    one_minus_t = 1.0 - t

    def near(v):
        v = v.double()
        return ((1.25 * v - 2.25) * v * v + 1.0).float()

    def far(v):
        v = v.double()
        return (((-0.75 * v + 3.75) * v - 6.0) * v + 3.0).float()

    weights = torch.stack([far(t + 1.0), near(t), near(one_minus_t), far(one_minus_t + 1.0)], dim=1)
    taps = (fl.long()[:, None] + torch.arange(-1, 3, device=pos.device)).clamp(0, in_size - 1)
    return taps, weights


def interp_pos_embed_reference(
    x: torch.Tensor,
    pos_table: torch.Tensor,
    token_meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    time_table: torch.Tensor | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Plain-PyTorch `interp_pos_embed` (returns a new tensor): the same weights, summed in fp64."""
    _check(x, pos_table, token_meta, bias, None, time_table, mode)
    h0, w0 = pos_table.shape[:2]
    h, w = token_meta[META_HEIGHT].long(), token_meta[META_WIDTH].long()
    valid = h > 0
    ys, wy = _axis_taps_reference(token_meta[META_ROW], h.clamp(min=1), h0, mode)
    xs, wx = _axis_taps_reference(token_meta[META_COL], w.clamp(min=1), w0, mode)
    table = pos_table.double()
    pe = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for i in range(ys.shape[1]):
        for j in range(xs.shape[1]):
            pe += (wy[:, i].double() * wx[:, j].double())[:, None] * table[ys[:, i], xs[:, j]]
    if time_table is not None:
        frame = token_meta[META_TIME].long()
        row = frame - 1
        inside = (row >= 0) & (row < time_table.shape[0])
        pe += torch.where(inside[:, None], time_table.double()[row.clamp(0, time_table.shape[0] - 1)], 0.0)
    xf = x.double() if bias is None else x.double() + bias.double()
    return torch.where(valid[:, None], xf + pe, 0.0).to(x.dtype)
