"""Block-diagonal attention over packed images, shared by every model class here, and the choice of
kernel per budget.

Two backends compute the same thing:
- "triton": `fused_moonvit.kernels.attention`, written for head dim 72 (64 + 16 wide, not padded to 96),
  with programs only for real query blocks and the padding sequence written as zeros. On a CPU it runs
  under the Triton interpreter.
- "fa2": PyTorch's FlashAttention-2 varlen kernel (`torch.nn.attention.varlen.varlen_attn`) on CUDA, with
  `max_seqlen` from the caller (the budget, inside a graph); one SDPA call per sequence on a CPU.

`choose_attention(budget, device)` picks the Triton kernel, with tile sizes per budget from the table below
(measured on an H200), unless `FUSED_MOONVIT_ATTENTION=triton|fa2` or the `backend` argument forces one.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

ATTENTION_ENV = "FUSED_MOONVIT_ATTENTION"
BACKENDS = ("triton", "fa2")


@dataclass(frozen=True)
class AttentionChoice:
    backend: str
    # Tile sizes for the Triton kernel (a `fused_moonvit.kernels.attention.AttentionConfig`), None for fa2.
    config: object | None = None


# (largest budget in patches, block_m, block_n, num_warps, num_stages), first row that holds the budget
# wins; measured on the H200 by `python -m fused_moonvit.benchmarks.tune_attention`
# (benchmarks/results/attention_tuning.json for the small budgets, attention_tuning_extra.log for 3 stages
# at 128 x 64 on the large ones). Budgets above the last row use the last row.
_TRITON_TILES: list[tuple[int, int, int, int, int]] = [
    (2048, 64, 64, 4, 3),
    (16384, 128, 64, 4, 3),
]


def sdpa_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Attention of packed (T, H, D) q, k, v within each [bounds[i], bounds[i+1]) row range, one SDPA call
    per sequence, so no row attends across images."""
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seq = [t[start:end].transpose(0, 1) for t in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*seq).transpose(0, 1)
    return out


@lru_cache(maxsize=None)
def _flash_only_kwargs() -> dict:
    # torch >= 2.14 sends varlen_attn to cuDNN on Hopper for sequences over 128 rows unless num_splits is
    # given. Everything here (zero-length slots, strided q/k/v views, capture, the H200 figures) was
    # validated on FlashAttention-2, so keep it there; num_splits=1 is FA2's own choice for batches
    # as wide as an encoder's. torch 2.11 has no such parameter and always uses FA2.
    from torch.nn.attention.varlen import varlen_attn

    return {"num_splits": 1} if "num_splits" in inspect.signature(varlen_attn).parameters else {}


def check_attention_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """The attention kernels take half precision only on CUDA: say so before any work, naming the dtype."""
    if torch.device(device).type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the fused encoder's attention on CUDA runs in bfloat16 or float16, got {dtype}; "
                        f"use model.to(torch.bfloat16), or the eager MoonVitReference for {dtype}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """The "fa2" backend: packed (T, H, D) attention where cu_seqlens (int32, on q's device) splits the
    rows into sequences.

    CUDA: PyTorch's FlashAttention-2 varlen kernel, capturable in a graph (max_seqlen is a host int).
    CPU: one SDPA call per sequence; reading the bounds there costs no device sync.
    """
    if q.is_cuda:
        check_attention_dtype(q.device, q.dtype)
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **_flash_only_kwargs())
    return sdpa_per_sequence(q, k, v, cu_seqlens.tolist())


def forced_attention_backend(backend: str | None) -> str | None:
    """The backend `backend` or $FUSED_MOONVIT_ATTENTION forces, None if neither does; a clear error for any
    other value."""
    forced = backend if backend is not None else (os.environ.get(ATTENTION_ENV) or None)
    if forced is not None and forced not in BACKENDS:
        source = "backend" if backend is not None else ATTENTION_ENV
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {forced!r}")
    return forced


def choose_attention(budget: int, device: torch.device | str, backend: str | None = None) -> AttentionChoice:
    """The attention for a graph (or eager call) of `budget` patch rows on `device`: the backend forced by
    `backend` or $FUSED_MOONVIT_ATTENTION, else the measured choice. Decided on the host, before capture."""
    from fused_moonvit.kernels.attention import AttentionConfig

    forced = forced_attention_backend(backend)
    if forced == "fa2":
        return AttentionChoice("fa2")
    if torch.device(device).type != "cuda":
        return AttentionChoice("triton", AttentionConfig(block_m=128, block_n=128))
    row = next((r for r in _TRITON_TILES if budget <= r[0]), _TRITON_TILES[-1])
    _, block_m, block_n, warps, stages = row
    return AttentionChoice("triton", AttentionConfig(block_m, block_n, warps, stages))


def packed_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int, head_dim: int,
                     max_seqlen: int, choice: AttentionChoice) -> torch.Tensor:
    """(B, H * D) attention of the packed (B, 3 * H * D) QKV output within each sequence of cu_seqlens
    (the plan's, whose last sequence is padding), by the chosen backend."""
    budget = qkv.shape[0]
    if choice.backend == "triton":
        from fused_moonvit.kernels.attention import varlen_attention_fwd

        return varlen_attention_fwd(qkv, cu_seqlens, num_heads, head_dim, config=choice.config)
    q, k, v = qkv.view(budget, 3, num_heads, head_dim).unbind(1)
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen).reshape(budget, num_heads * head_dim)
