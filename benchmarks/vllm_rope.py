"""The 2D RoPE as vLLM 0.34's MoonViT3d (Kimi-K2.5 / K2.6 / K3) applies it, for the baseline of
benchmarks/hostmeta.py: q and k rotated in place inside the packed QKV buffer by one Triton launch per
layer. Written for this project from the contract below; not vLLM's code.

The contract is vLLM's `packed_qk_rope_`: `qkv` is the contiguous (T, 3, H, D) view of wqkv's output and
`freqs_cis` the contiguous (T, D / 2) complex64 rotations, one row per token, that vLLM builds on every
call outside its graph (a slice of a table precomputed once, per item, repeated over a chunk's frames).
Every one of the T rows is rotated, padding rows included, by its freqs_cis row; v is neither read nor
written. Each pair (2j, 2j + 1) of a head is (real, imag) times freqs_cis[:, j], computed in fp32 from the
complex64 parts and rounded once to qkv's dtype. The cost profile is vLLM's: programs of 4 tokens x one
q or k head over the whole head dim padded to a power of two (2 or 4 warps), each reading its tokens'
freqs_cis rows again, so a token's rotations are read 2H times, mostly from cache.

vLLM 0.34's Kimi-VL tower (MoonVit, model_executor/models/moonvit.py) does not use this kernel: it still
rotates q and k through complex tensors, as hostmeta.py's Kimi-VL baseline does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_moonvit.kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor, next_pow2
from fused_moonvit.kernels._rounding import round_to

# vLLM's launch: 4 tokens per program, 2 warps up to head dim 64, else 4. The interpreter's cost is per
# program, so there a program takes 64 tokens; the numerics are the same.
TOKENS_PER_PROGRAM = 4
INTERPRETED_TOKENS_PER_PROGRAM = 64


@triton.jit(do_not_specialize=["tokens"])
def _vllm_packed_qk_rope_kernel(
    qkv_ptr, rot_ptr, tokens,
    ROW_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS_P2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Program (token block, head): heads 0..H-1 are q's, H..2H-1 k's, adjacent in a row, so head h
    # starts at column h * D.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    pair = tl.arange(0, PAIRS_P2)
    part = tl.arange(0, 2)
    # [BLOCK_T, PAIRS_P2, 2]: a head's D values as contiguous (real, imag) pairs, so loads stay vectorised.
    lane = 2 * pair[None, :, None] + part[None, None, :]
    live = (t < tokens)[:, None, None] & (lane < HEAD_DIM)
    x_offs = t.to(tl.int64)[:, None, None] * ROW_STRIDE + tl.program_id(1) * HEAD_DIM + lane
    x = tl.load(qkv_ptr + x_offs, mask=live, other=0.0).to(tl.float32)
    # freqs_cis read as fp32 (cos, sin) pairs: row t holds D values.
    f = tl.load(rot_ptr + t.to(tl.int64)[:, None, None] * HEAD_DIM + lane, mask=live, other=0.0)
    re, im = tl.split(x)
    cos, sin = tl.split(f)
    out = tl.join(re * cos - im * sin, re * sin + im * cos)
    tl.store(qkv_ptr + x_offs, round_to(out, qkv_ptr.dtype.element_ty), mask=live)


def _check(qkv: torch.Tensor, freqs_cis: torch.Tensor) -> None:
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, shape=(None, 3, None, None))
    tokens, _, heads, head_dim = qkv.shape
    if head_dim % 2 or head_dim == 0 or heads == 0:
        raise ValueError(f"qkv must be (T, 3, H, D) with H > 0 heads of an even D > 0, got shape {tuple(qkv.shape)}")
    check_tensor("freqs_cis", freqs_cis, dtypes=(torch.complex64,), shape=(tokens, head_dim // 2), device=qkv.device)


def packed_qk_rope_(qkv: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate q and k of the packed (T, 3, H, D) qkv in place by freqs_cis (T, D / 2) complex64; returns qkv."""
    _check(qkv, freqs_cis)
    tokens, _, heads, head_dim = qkv.shape
    interpreted = check_launchable(_vllm_packed_qk_rope_kernel, qkv.device)
    block_t = INTERPRETED_TOKENS_PER_PROGRAM if interpreted else TOKENS_PER_PROGRAM
    if tokens:
        _vllm_packed_qk_rope_kernel[(triton.cdiv(tokens, block_t), 2 * heads)](
            qkv, torch.view_as_real(freqs_cis), tokens,
            ROW_STRIDE=3 * heads * head_dim, HEAD_DIM=head_dim, PAIRS_P2=next_pow2(head_dim // 2),
            BLOCK_T=block_t, num_warps=2 if head_dim <= 64 else 4,
        )
    return qkv


def packed_qk_rope_reference(qkv: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch `packed_qk_rope_` (returns a new tensor): the same rotations, applied in fp64."""
    _check(qkv, freqs_cis)
    out = qkv.clone()
    qk = torch.view_as_complex(qkv[:, :2].double().unflatten(-1, (-1, 2)).contiguous())
    out[:, :2] = torch.view_as_real(qk * freqs_cis.to(torch.complex128)[:, None, None, :]).flatten(-2).to(qkv.dtype)
    return out
