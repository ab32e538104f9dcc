"""2x2 patch merge fused with the projector's pre-norm LayerNorm (and MoonViT3d's average over frames).

For merged output token o (row-major over each item's (h / 2, w / 2) grid, items in order, their
offsets in the plan's cu_outputs), the four sub-tokens (0, 0), (0, 1), (1, 0), (1, 1) of its 2x2 block
are gathered, each is normalised by LayerNorm(C) (fp32 mean and biased variance, then weight and bias),
and the four results are written side by side as one 4C row: the (B / 4, 4C) input of the projector's
first linear. This replaces vLLM's per-image view/permute/contiguous, the concatenation and the pre-norm
pass. Without LayerNorm parameters it is the plain merge (a tower without the projector, or Kimi-K3's
projector, which has no pre-norm).

An item of t > 1 frames (a video chunk) is averaged over its frames, position by position, before the
merge, as vLLM's and transformers' temporal pooling do: each sub-token is the fp32 mean of the t rows
h * w apart. vLLM rounds that mean to the activation dtype before the pre-norm; here it stays fp32 into
the norm (one rounding fewer, so closer to the fp32 result).

Since out viewed as (B, C) is just sub-token rows in order (row 4 o + q is sub-token q of output o), a
program normalises a block of consecutive (B, C) rows, each gathered from its own source row.

Output rows past the valid ones (padding) are written as zeros: every row is written, and none depends
on what the padding input rows hold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor, next_pow2
from ._rounding import round_to
from .launch import launch_settings
from .layernorm import normalize_rows
from .limits import check_int
from .plan import META_MERGE_FRAMES, META_MERGE_SRC, META_MERGE_STRIDE, META_MERGE_WIDTH, META_ROWS

# Launch settings (see kernels/launch.py). A program holds whole rows in registers, so the LayerNorm
# statistics need no second pass over memory: as many rows as fit in `elements_per_program`, and at
# least one merged token (four rows). On the GPU that is one merged token per program at 1152 channels,
# with 4 warps (fastest of an H200 sweep at 16384 tokens); as many rows as fit for the interpreter.
MERGE_PATCHES_LAUNCH = [
    {"device_class": "cpu", "elements_per_program": 16384, "num_warps": 4},
    {"device_class": "sm90", "elements_per_program": 2048, "num_warps": 4},
]


@triton.jit
def _merge_patches_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, src_ptr, width_ptr, frames_ptr, stride_ptr, num_rows, eps,
    C: tl.constexpr, HAS_NORM: tl.constexpr, MAX_FRAMES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    r_live = r < num_rows
    c_live = c < C
    o = r // 4
    q = r % 4
    src = tl.load(src_ptr + o, mask=r_live, other=-1)
    width = tl.load(width_ptr + o, mask=r_live, other=0)
    valid = src >= 0
    sub = src + (q // 2) * width + (q % 2)

    live = r_live[:, None] & c_live[None, :]
    gather = live & valid[:, None]
    rows = sub.to(tl.int64)[:, None] * C + c[None, :]
    y = tl.load(x_ptr + rows, mask=gather, other=0.0).to(tl.float32)
    if MAX_FRAMES > 1:
        frames = tl.load(frames_ptr + o, mask=r_live, other=1)
        frame_step = tl.load(stride_ptr + o, mask=r_live, other=0).to(tl.int64)[:, None] * C
        for f in tl.static_range(1, MAX_FRAMES):
            more = gather & (f < frames)[:, None]
            y += tl.load(x_ptr + rows + f * frame_step, mask=more, other=0.0).to(tl.float32)
        y = y / tl.minimum(tl.maximum(frames, 1), MAX_FRAMES).to(tl.float32)[:, None]
    if HAS_NORM:
        y = normalize_rows(y, w_ptr, b_ptr, c, c_live, eps, C, False)
    y = tl.where(valid[:, None], y, 0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * C + c[None, :], round_to(y, out_ptr.dtype.element_ty), mask=live)


def _check(x, token_meta, ln_weight, ln_bias, out, max_frames):
    check_int("max_frames", max_frames, 1)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None))
    budget, channels = x.shape
    if budget % 4:
        raise ValueError(f"x must have a multiple of 4 rows for the 2x2 merge, got {budget}")
    dev = x.device
    check_tensor("token_meta", token_meta, dtypes=(torch.int32,), shape=(META_ROWS, budget), device=dev)
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must be given together (or both None for a plain merge)")
    if ln_weight is not None:
        check_tensor("ln_weight", ln_weight, dtypes=FLOAT_DTYPES, shape=(channels,), device=dev)
        check_tensor("ln_bias", ln_bias, dtypes=FLOAT_DTYPES, shape=(channels,), device=dev)
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=(budget // 4, 4 * channels), device=dev)


def merge_patches(
    x: torch.Tensor,
    token_meta: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    max_frames: int = 1,
) -> torch.Tensor:
    """Gather each merged token's 2x2 sub-tokens (averaged over an item's frames), LayerNorm each over C,
    write (B / 4, 4C).

    x: (B, C) encoder output (after the final LayerNorm), fp32/bf16/fp16, contiguous.
    token_meta: int32 (META_ROWS, B) from `expand_plan`.
    ln_weight, ln_bias: (C,) the projector's pre-norm parameters; both None for the plain merge (a
        MoonViT tower without the Kimi-VL projector).
    out: optional (B / 4, 4C) output of x's dtype.
    max_frames: the most frames an item of the plan may have (the tower's time-table length; 1 for
        Kimi-VL): the kernel reads and averages an item's first min(t, max_frames) frames, never more.
        The encoder's input checks refuse longer items before they get here.
    """
    _check(x, token_meta, ln_weight, ln_bias, out, max_frames)
    budget, channels = x.shape
    if out is None:
        out = torch.empty(budget // 4, 4 * channels, dtype=x.dtype, device=x.device)
    launch = launch_settings(MERGE_PATCHES_LAUNCH, _merge_patches_kernel, x.device, channels=channels)
    block_c = next_pow2(channels)
    block_r = max(4, launch["elements_per_program"] // block_c)
    _merge_patches_kernel[(triton.cdiv(budget, block_r),)](
        x, x if ln_weight is None else ln_weight, x if ln_bias is None else ln_bias, out,
        token_meta[META_MERGE_SRC], token_meta[META_MERGE_WIDTH], token_meta[META_MERGE_FRAMES],
        token_meta[META_MERGE_STRIDE], budget, eps,
        C=channels, HAS_NORM=ln_weight is not None, MAX_FRAMES=max_frames,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=launch["num_warps"],
    )
    return out


def merge_patches_reference(
    x: torch.Tensor,
    token_meta: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    max_frames: int = 1,
) -> torch.Tensor:
    """Plain-PyTorch `merge_patches` (fp64 frame mean, statistics and affine, one rounding)."""
    _check(x, token_meta, ln_weight, ln_bias, None, max_frames)
    budget, channels = x.shape
    src = token_meta[META_MERGE_SRC, : budget // 4].long()
    width = token_meta[META_MERGE_WIDTH, : budget // 4].long()
    frames = token_meta[META_MERGE_FRAMES, : budget // 4].long()
    stride = token_meta[META_MERGE_STRIDE, : budget // 4].long()
    valid = src >= 0
    offsets = torch.stack([torch.zeros_like(width), torch.ones_like(width), width, width + 1], dim=1)
    rows = (src[:, None] + offsets).clamp(min=0)  # (B / 4, 4)
    y = torch.zeros(budget // 4, 4, channels, dtype=torch.float64, device=x.device)
    read = frames.clamp(min=1, max=max_frames)
    for f in range(max_frames):
        taken = (f < read)[:, None, None]
        y += torch.where(taken, x.double()[(rows + f * stride[:, None]).clamp(max=budget - 1)], 0.0)
    y = y / read.double()[:, None, None]
    if ln_weight is not None:
        mean = y.mean(dim=-1, keepdim=True)
        var = ((y - mean) ** 2).mean(dim=-1, keepdim=True)
        y = (y - mean) / torch.sqrt(var + eps) * ln_weight.double() + ln_bias.double()
    y = torch.where(valid[:, None, None], y, 0.0)
    return y.reshape(budget // 4, 4 * channels).to(x.dtype)
