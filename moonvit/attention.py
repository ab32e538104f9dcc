"""Block-diagonal attention over packed items, shared by every model class here, and the choice of
kernel per (device class, head dim, budget).

Four backends compute the same thing: each row attends to the rows of its own sequence of cu_seqlens,
and the plan's trailing padding sequence is not attended (its rows come out as zeros).
- "triton": `fused_moonvit.kernels.attention`, head dim 72 as 64 + 16 columns (not padded to 96),
  programs only for real query blocks. On a CPU it runs under the Triton interpreter.
- "gluon": `fused_moonvit.kernels.attention_gluon`, the same work on Hopper in Gluon: TMA loads by a
  producer warp, asynchronous wgmma, head dim 72 as 80 columns. Hopper only (Gluon has no interpreter).
- "fa3": vLLM's FlashAttention-3 (`_vllm_fa3_C`, Hopper only), what vLLM itself runs ViT attention on
  there. Found in the installed vLLM without importing it, or loaded from the file that
  $FUSED_MOONVIT_FA3_LIB names (where vLLM itself is not installed).
- "fa2": PyTorch's FlashAttention-2 varlen kernel (`torch.nn.attention.varlen.varlen_attn`); one SDPA
  call per sequence on a CPU.
Every one reads cu_seqlens on the device only (no host sync), so all are capturable in a graph whose
plan changes between replays; max_seqlen is a host int (the budget, inside a graph).

`choose_attention` picks, before capture, the fastest backend that is available here from a table
measured by `python -m fused_moonvit.benchmarks.tune_attention` (attention_table.json beside this
file), unless the `backend` argument or $FUSED_MOONVIT_ATTENTION forces one. Inside a graph the longest
sequence a budget allows is the budget itself, so the table is keyed by budget.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from fused_moonvit.kernels.launch import device_class, select_row

ATTENTION_ENV = "FUSED_MOONVIT_ATTENTION"
FA3_LIB_ENV = "FUSED_MOONVIT_FA3_LIB"
BACKENDS = ("triton", "gluon", "fa3", "fa2")
# Backends that may read past an item's last row: FA3 loads a sequence's last key tile whole and multiplies
# the masked values by P = 0, so a NaN or Inf in the first rows of the next item turns this one NaN. The
# encoder keeps non-finite items from reaching them (`FusedMoonVit.forward_static`).
LEAKY_BACKENDS = frozenset({"fa3"})
TABLE_PATH = Path(__file__).with_name("attention_table.json")


@dataclass(frozen=True)
class AttentionChoice:
    backend: str
    # Tile sizes: a `fused_moonvit.kernels.attention.AttentionConfig` for "triton", a
    # `fused_moonvit.kernels.attention_gluon.GluonAttentionConfig` for "gluon", None otherwise.
    config: object | None = None


def sdpa_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Attention of packed (T, H, D) q, k, v within each [bounds[i], bounds[i+1]) row range, one SDPA call
    per sequence, so no row attends across items. Rows past bounds[-1] are zeros."""
    out = torch.zeros_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seq = [t[start:end].transpose(0, 1) for t in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*seq).transpose(0, 1)
    return out


def check_attention_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """The attention kernels take half precision only on CUDA: say so before any work, naming the dtype."""
    if torch.device(device).type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the fused encoder's attention on CUDA runs in bfloat16 or float16, got {dtype}; "
                        f"use model.to(torch.bfloat16), or the eager MoonVitReference for {dtype}")


# ---- vLLM's FlashAttention-3 ---------------------------------------------------------------------------

def fa3_library_path() -> str | None:
    """The `_vllm_fa3_C` extension to load: $FUSED_MOONVIT_FA3_LIB, else the installed vLLM's (found without
    importing vLLM), else None."""
    path = os.environ.get(FA3_LIB_ENV)
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{FA3_LIB_ENV}={path!r} is not a file; point it at vLLM's "
                                    "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so")
        return path
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root, "vllm_flash_attn", "_vllm_fa3_C.abi3.so")
        if candidate.is_file():
            return str(candidate)
    return None


@lru_cache(maxsize=None)
def _fa3_op():
    """torch.ops._vllm_fa3_C.fwd, loaded once (vLLM may have loaded it already), and its argument names."""
    if not hasattr(torch.ops._vllm_fa3_C, "fwd"):
        path = fa3_library_path()
        if path is None:
            raise RuntimeError(f"vLLM's FlashAttention-3 was not found: install vLLM, or set {FA3_LIB_ENV} to "
                               "its vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so")
        torch.ops.load_library(path)
    op = torch.ops._vllm_fa3_C.fwd.default
    return op, op._schema.arguments


@lru_cache(maxsize=None)
def fa3_unavailable_reason(device_cls: str) -> str | None:
    """Why vLLM's FA3 cannot run on this device class here, or None: it needs Hopper and its library."""
    if device_cls != "sm90":
        return f"FA3 runs on Hopper (sm90) only, this is {device_cls}"
    try:
        _fa3_op()
    except (RuntimeError, OSError) as exc:  # not found, not a file, or a library that does not load
        return str(exc)
    return None


def fa3_varlen(q, k, v, cu_seqlens, max_seqlen: int, out: torch.Tensor) -> torch.Tensor:
    """vLLM 0.34's FA3 call for ViT attention (non-causal, no window, FA3's own split heuristics), written
    into `out`. The op's arguments are passed by name from its schema, so an added optional one is None."""
    op, arguments = _fa3_op()
    given = dict(q=q, k=k, v=v, out=out, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                 max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, softmax_scale=q.shape[-1] ** -0.5,
                 is_causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
                 is_rotary_interleaved=True, num_splits=0, sm_margin=0, cp_world_size=1, cp_rank=0)
    args = []
    for a in arguments:
        if a.name in given:
            args.append(given[a.name])
        elif a.has_default_value():
            args.append(a.default_value)
        elif isinstance(a.type, torch.OptionalType):
            args.append(None)
        else:
            raise RuntimeError(f"vLLM's FA3 op takes an argument {a.name!r} ({a.type}) this project does not "
                               f"know; force another attention backend with {ATTENTION_ENV}")
    op(*args)
    return out


# ---- PyTorch's FlashAttention-2 ------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _flash_only_kwargs() -> dict:
    # torch >= 2.14 sends varlen_attn to cuDNN on Hopper for sequences over 128 rows unless num_splits is
    # given; "fa2" means FlashAttention-2 (cuDNN's ragged attention cannot be captured in a graph on torch
    # 2.11: cudaErrorStreamCaptureInvalidated, seen on an H100). num_splits=1 is FA2's own choice
    # for batches as wide as an encoder's. torch 2.11 has no such parameter and always uses FA2.
    from torch.nn.attention.varlen import varlen_attn

    return {"num_splits": 1} if "num_splits" in inspect.signature(varlen_attn).parameters else {}


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """Packed (T, H, D) FlashAttention-2 attention within each sequence of cu_seqlens (int32, on q's device).
    CUDA: PyTorch's varlen kernel, capturable (max_seqlen is a host int); rows past cu_seqlens[-1] are left
    unwritten. CPU: one SDPA call per sequence, rows past cu_seqlens[-1] zeros; reading the bounds there
    costs no device sync."""
    if q.is_cuda:
        check_attention_dtype(q.device, q.dtype)
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **_flash_only_kwargs())
    return sdpa_per_sequence(q, k, v, cu_seqlens.tolist())


# ---- the choice ----------------------------------------------------------------------------------------

def backend_unavailable_reason(backend: str, device: torch.device | str, head_dim: int | None = None) -> str | None:
    """Why `backend` cannot run on `device` (for `head_dim`, where given) here, or None. The Triton kernel
    (interpreted on a CPU) and fa2 (SDPA per sequence on a CPU) run anywhere."""
    if backend == "fa3":
        return fa3_unavailable_reason(device_class(device))
    if backend == "gluon":
        from fused_moonvit.kernels.attention_gluon import gluon_unavailable_reason

        return gluon_unavailable_reason(device, head_dim)
    return None


def backend_available(backend: str, device: torch.device | str, head_dim: int | None = None) -> bool:
    return backend_unavailable_reason(backend, device, head_dim) is None


def forced_attention_backend(backend: str | None) -> str | None:
    """The backend `backend` or $FUSED_MOONVIT_ATTENTION forces, None if neither does; a clear error for any
    other value."""
    forced = backend if backend is not None else (os.environ.get(ATTENTION_ENV) or None)
    if forced is not None and forced not in BACKENDS:
        source = "backend" if backend is not None else ATTENTION_ENV
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {forced!r}")
    return forced


@lru_cache(maxsize=None)
def attention_table() -> dict:
    """The measured table: {"measured": {device class: where and how}, "rows": [{device_class, head_dim, max_budget,
    ranking: [{backend, config?}, ...]}, ...]}, rows of one (device class, head dim) in budget order; config is
    the Triton kernel's [block_m, block_n, warps, stages] or the Gluon kernel's tiles by name."""
    with open(TABLE_PATH) as f:
        return json.load(f)


# Where the table has no row for a device class or head dim: the Triton kernel's tiles by budget as
# measured on the H200 before FA3 was a backend (rows: largest budget, block_m, block_n, warps, stages).
_DEFAULT_TILES = [(2048, 64, 64, 4, 3), (16384, 128, 64, 4, 3)]


def _triton(config: Sequence[int] | None, budget: int, device: torch.device) -> AttentionChoice:
    """The Triton kernel with `config` (block_m, block_n, warps, stages), or the default tiles for `budget`."""
    from fused_moonvit.kernels.attention import AttentionConfig

    if device.type != "cuda":
        # The interpreter runs each program's tiles one by one: large tiles mean fewer, faster steps.
        return AttentionChoice("triton", AttentionConfig(block_m=128, block_n=128))
    if not config:
        config = next((t for t in _DEFAULT_TILES if budget <= t[0]), _DEFAULT_TILES[-1])[1:]
    return AttentionChoice("triton", AttentionConfig(*config))


def choose_attention(budget: int, device: torch.device | str, head_dim: int,
                     backend: str | None = None) -> AttentionChoice:
    """The attention for a graph (or eager call) of `budget` patch rows of head dim `head_dim` on `device`:
    the backend forced by `backend` or $FUSED_MOONVIT_ATTENTION, else the fastest available one by the
    measured table. Decided on the host, before capture; a forced backend that cannot run here fails here."""
    device = torch.device(device)
    forced = forced_attention_backend(backend)
    cls = device_class(device)
    row = select_row(attention_table()["rows"], device_class=cls, head_dim=head_dim, budget=budget)
    ranking = row["ranking"] if row is not None else [{"backend": "fa3"}, {"backend": "triton"}]
    if forced is not None:
        reason = backend_unavailable_reason(forced, device, head_dim)
        if reason is not None:
            raise RuntimeError(f"attention backend {forced!r} cannot run on {device} here: {reason}")
        ranking = [e for e in ranking if e["backend"] == forced] or [{"backend": forced}]
    for entry in ranking:
        if entry["backend"] == "triton":
            return _triton(entry.get("config"), budget, device)
        if backend_available(entry["backend"], device, head_dim):
            if entry["backend"] == "gluon":
                from fused_moonvit.kernels.attention_gluon import GluonAttentionConfig

                return AttentionChoice("gluon", GluonAttentionConfig(**entry.get("config", {})))
            return AttentionChoice(entry["backend"])
    return _triton(None, budget, device)


def packed_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int, head_dim: int,
                     max_seqlen: int, choice: AttentionChoice) -> torch.Tensor:
    """(B, H * D) attention of the packed (B, 3 * H * D) QKV output within each sequence of cu_seqlens
    (the plan's: S + 2 entries, the last sequence padding), by the chosen backend. Padding rows are zeros.
    The FA3 backend also zeroes the padding rows' k and v in qkv, in place."""
    budget = qkv.shape[0]
    if choice.backend == "triton":
        from fused_moonvit.kernels.attention import varlen_attention_fwd

        return varlen_attention_fwd(qkv, cu_seqlens, num_heads, head_dim, config=choice.config)
    if choice.backend == "gluon":
        from fused_moonvit.kernels.attention_gluon import gluon_attention_fwd

        return gluon_attention_fwd(qkv, cu_seqlens, num_heads, head_dim, config=choice.config)
    q, k, v = qkv.view(budget, 3, num_heads, head_dim).unbind(1)
    # The item sequences alone: cu_seqlens[:-1] ends where the padding starts, so no library attends it.
    items = cu_seqlens[:-1]
    if choice.backend == "fa3":
        from fused_moonvit.kernels.attention import zero_padding_rows

        # FA3 loads a sequence's last key tile whole and masks the scores, so P is 0 there but P @ V still
        # multiplies the rows past the end: zeroed padding keeps its leftovers (NaN, say) out of the last
        # item. The rows of the item that follows are read the same way: see docs/design.md section 13.
        zero_padding_rows(qkv, cu_seqlens, num_heads * head_dim)
        out = torch.zeros(budget, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        return fa3_varlen(q, k, v, items, max_seqlen, out).view(budget, num_heads * head_dim)
    out = varlen_attention(q, k, v, items, max_seqlen).reshape(budget, num_heads * head_dim)
    if not qkv.is_cuda:
        return out  # SDPA per sequence leaves the rows past the last item at zero
    # FA2 leaves them unwritten: zero them on the device, without a sync.
    live = torch.arange(budget, device=qkv.device) < cu_seqlens[-2]
    return torch.where(live[:, None], out, 0)
