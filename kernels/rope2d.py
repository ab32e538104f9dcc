"""2D rotary position embedding of q and k, in place in the packed QKV projection output.

qkv is (B, 3 * H * D) with rows [Q | K | V] and each head's D values contiguous, as MoonVit's wqkv
produces it. Each head's D dims form D / 2 adjacent pairs (2j, 2j + 1) = (real, imag); pair 2i rotates
by col * f_i and pair 2i + 1 by row * f_i, with (row, col) the token's patch position in its image and
f_i = 1 / theta ** (4 i / D). Q and K are rotated in place; V is not touched. Working in place keeps
the attention's input layout: `qkv.view(B, 3, H, D)` gives q, k and v as (B, H, D) views with unit
stride over the head dim, which varlen attention takes as they are.

cos and sin come from a table built once by PyTorch (`rope_cos_sin_table`) exactly as vLLM builds its
freqs_cis, and are looked up by position. Recomputing them in the kernel would need the very same fp32
frequencies (one ulp off moves 511 * f_i enough to cost ~4e-6 relative error) and 32 sin/cos per pair
position, one per head of q and k. The rotation is done in fp32, (a + ib)(cos + i sin), with one rounding
to the storage dtype.

Padding tokens (image -1) get q = k = 0, so the padding sequence's attention scores are finite whatever
the buffer held.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor, next_pow2
from ._rounding import round_to
from .launch import launch_settings
from .limits import MAX_GRID_SIDE
from .plan import META_COL, META_HEIGHT, META_ROW, META_ROWS

# Launch settings (see kernels/launch.py): a program rotates `block_tokens` tokens x up to
# `max_block_pairs` pairs. Largest blocks for the interpreter; on the GPU, 4 tokens x 256 pairs x 8 warps
# was the fastest of an H200 sweep at 256 and near the fastest at 4096 tokens.
ROPE_2D_LAUNCH = [
    {"device_class": "cpu", "block_tokens": 256, "max_block_pairs": 1024, "num_warps": 8},
    {"device_class": "sm90", "block_tokens": 4, "max_block_pairs": 256, "num_warps": 8},
]


def rope_cos_sin_table(freqs: torch.Tensor, max_pos: int = MAX_GRID_SIDE) -> torch.Tensor:
    """fp32 (max_pos, D / 4, 2) table of (cos, sin)(p * f_i) for p = 0..max_pos-1, on freqs' device.

    freqs: the (D / 4,) fp32 frequencies, 1 / theta ** (arange(0, D, 4)[:D // 4].float() / D) as vLLM
    computes them. The angles are the fp32 outer product and cos/sin come from torch.polar, as in vLLM's
    Rope2DPosEmb.precomputed_freqs_cis, so a table built on vLLM's device (CUDA) holds its values bit
    for bit. Build it once per model and device.
    """
    check_tensor("freqs", freqs, dtypes=(torch.float32,), shape=(None,))
    angles = torch.outer(torch.arange(max_pos, device=freqs.device).float(), freqs)
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).contiguous()


@triton.jit
def _rope_2d_kernel(
    qkv_ptr, cs_ptr, row_ptr, col_ptr, h_ptr, budget,
    ROW_STRIDE: tl.constexpr, NUM_PAIRS: tl.constexpr, HALF_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Pair p of a token covers elements 2p, 2p + 1 of its row; Q and K are adjacent, so p runs over both
    # (NUM_PAIRS = H * D) and the pair's place inside its head is p % (D / 2) for either.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    t_live = t < budget
    p_live = p < NUM_PAIRS
    live = t_live[:, None] & p_live[None, :]

    # Each token's pairs as one contiguous [BLOCK_T, BLOCK_P, 2] block, so that loads and stores stay
    # vectorised; real and imaginary parts are split by a 2-wide in-register reduction. Issued first:
    # it does not wait for the position lookups below.
    part = tl.arange(0, 2)
    offs = t.to(tl.int64)[:, None, None] * ROW_STRIDE + 2 * p[None, :, None] + part[None, None, :]
    live3 = live[:, :, None] & (part < 2)[None, None, :]
    z = tl.load(qkv_ptr + offs, mask=live3, other=0.0).to(tl.float32)

    row = tl.load(row_ptr + t, mask=t_live, other=0)
    col = tl.load(col_ptr + t, mask=t_live, other=0)
    valid = tl.load(h_ptr + t, mask=t_live, other=0) > 0
    j = p % HALF_D
    on_row = (j % 2) == 1
    pos = tl.where(on_row[None, :], row[:, None], col[:, None])
    cs = cs_ptr + (pos * (HALF_D // 2) + (j // 2)[None, :]) * 2
    cos = tl.load(cs, mask=live, other=1.0)
    sin = tl.load(cs + 1, mask=live, other=0.0)

    is_im = (part == 1)[None, None, :]
    re = tl.sum(tl.where(is_im, 0.0, z), axis=2)
    im = tl.sum(tl.where(is_im, z, 0.0), axis=2)
    out_re = tl.where(valid[:, None], re * cos - im * sin, 0.0)
    out_im = tl.where(valid[:, None], re * sin + im * cos, 0.0)
    out = tl.where(is_im, out_im[:, :, None], out_re[:, :, None])
    tl.store(qkv_ptr + offs, round_to(out, qkv_ptr.dtype.element_ty), mask=live3)


def _check(qkv, token_meta, cos_sin, num_heads, head_dim):
    if head_dim % 4 or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive multiple of 4, got {head_dim}")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, shape=(None, 3 * num_heads * head_dim))
    dev = qkv.device
    check_tensor("token_meta", token_meta, dtypes=(torch.int32,), shape=(META_ROWS, qkv.shape[0]), device=dev)
    if isinstance(cos_sin, torch.Tensor) and cos_sin.dim() == 1:
        raise ValueError(f"cos_sin must be the (512, {head_dim // 4}, 2) table that rope_cos_sin_table(freqs) "
                         f"builds once, got a 1-D tensor of shape {tuple(cos_sin.shape)}")
    check_tensor("cos_sin", cos_sin, dtypes=(torch.float32,), shape=(None, head_dim // 4, 2), device=dev)
    if cos_sin.shape[0] < MAX_GRID_SIDE:
        # Positions are not read back on the host, so the table must cover every position a plan allows.
        raise ValueError(f"cos_sin must cover {MAX_GRID_SIDE} positions, got {cos_sin.shape[0]}")


def apply_rope_2d(
    qkv: torch.Tensor, token_meta: torch.Tensor, cos_sin: torch.Tensor, num_heads: int, head_dim: int
) -> torch.Tensor:
    """Rotate q and k of the packed (B, 3 * H * D) QKV output in place; returns qkv.

    token_meta: int32 (META_ROWS, B) from `expand_plan`.
    cos_sin: fp32 (>= 512, D / 4, 2) from `rope_cos_sin_table(freqs)`, on qkv's device.
    """
    _check(qkv, token_meta, cos_sin, num_heads, head_dim)
    budget = qkv.shape[0]
    num_pairs = num_heads * head_dim
    launch = launch_settings(ROPE_2D_LAUNCH, _rope_2d_kernel, qkv.device, head_dim=head_dim)
    block_t = launch["block_tokens"]
    block_p = min(next_pow2(num_pairs), launch["max_block_pairs"])
    grid = (triton.cdiv(budget, block_t), triton.cdiv(num_pairs, block_p))
    _rope_2d_kernel[grid](
        qkv, cos_sin, token_meta[META_ROW], token_meta[META_COL], token_meta[META_HEIGHT], budget,
        ROW_STRIDE=qkv.shape[1], NUM_PAIRS=num_pairs, HALF_D=head_dim // 2,
        BLOCK_T=block_t, BLOCK_P=block_p, num_warps=launch["num_warps"],
    )
    return qkv


def apply_rope_2d_reference(
    qkv: torch.Tensor, token_meta: torch.Tensor, cos_sin: torch.Tensor, num_heads: int, head_dim: int
) -> torch.Tensor:
    """Plain-PyTorch `apply_rope_2d` (returns a new tensor): the same table, rotation in fp64."""
    _check(qkv, token_meta, cos_sin, num_heads, head_dim)
    budget = qkv.shape[0]
    out = qkv.clone()
    valid = token_meta[META_HEIGHT] > 0
    # Pair j of a head: j even -> column, j odd -> row; frequency j // 2.
    pos = torch.stack([token_meta[META_COL], token_meta[META_ROW]], dim=1).long()  # (B, 2)
    pos = pos.repeat(1, head_dim // 4)  # (B, D / 2)
    freq = torch.arange(head_dim // 2, device=qkv.device) // 2
    cos = cos_sin[pos, freq, 0].double()[:, None, :]  # (B, 1, D / 2)
    sin = cos_sin[pos, freq, 1].double()[:, None, :]
    qk = qkv[:, : 2 * num_heads * head_dim].double().view(budget, 2 * num_heads, head_dim // 2, 2)
    re, im = qk[..., 0], qk[..., 1]
    rot = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    rot = torch.where(valid[:, None, None, None], rot, 0.0)
    out[:, : 2 * num_heads * head_dim] = rot.reshape(budget, -1).to(qkv.dtype)
    return out
