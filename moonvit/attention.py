"""Block-diagonal attention over packed images, shared by every model class here."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F


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
    """FlashAttention takes half precision only: say so before any work, naming the dtype."""
    if torch.device(device).type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the fused encoder's attention on CUDA runs in bfloat16 or float16, got {dtype}; "
                        f"use model.to(torch.bfloat16), or the eager MoonVitReference for {dtype}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """Packed (T, H, D) attention where cu_seqlens (int32, on q's device) splits the rows into sequences.

    CUDA: PyTorch's FlashAttention-2 varlen kernel, capturable in a graph (max_seqlen is a host int).
    CPU: one SDPA call per sequence; reading the bounds there costs no device sync.
    """
    if q.is_cuda:
        check_attention_dtype(q.device, q.dtype)
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **_flash_only_kwargs())
    return sdpa_per_sequence(q, k, v, cu_seqlens.tolist())
