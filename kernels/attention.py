"""Block-diagonal attention over packed images, read straight from the packed QKV projection output.

qkv is (B, 3 * H * D) with rows [Q | K | V] and each head's D values contiguous, as MoonVit's wqkv
produces it (after `apply_rope_2d`); `cu_seqlens` (S + 2 entries, int32, on the device) splits the B
rows into sequences, the last of which is the plan's trailing padding sequence. Each row attends to the
rows of its own sequence, non-causally, with softmax scale 1 / sqrt(D); out is (B, H * D), the input of
the output projection.

How the work is laid out, and why:
- Head dim 72 is not a power of two, which `tl.dot` needs. FlashAttention rounds it up to 96; here each
  head is a 64-wide part plus a 16-wide tail of which 8 columns are real, so the matrix units do 80
  columns of work for 72 (90% useful) and nothing is copied: the tail's other 8 columns are masked loads.
- Programs map to real (sequence, query block) tiles. A program finds its tile from cu_seqlens alone
  (a prefix sum of the sequences' block counts, S + 1 values), so no per-budget table or host sync is
  needed and the grid depends on the budget only. The grid is cdiv(B, BLOCK_M) + a few programs per
  head, whatever the slot count S, and a program loops over tiles with that stride: the partial last
  blocks of many sequences are taken by the same programs instead of S more per head. (The FA2 launch
  this replaces had cdiv(B, 128) x (S + 1) programs per head.)
- The padding sequence is not attended: its rows are written as zeros, which keeps them finite and
  costs one store.
- Softmax runs online in fp32 with exp2 (scale folded with log2 e); P is rounded to the input dtype for
  the second product, as FlashAttention does; the accumulators are fp32 and the output is rounded once.
  Only a sequence's last key block, which may run past its end, is loaded and scored with masks.

Block sizes are chosen per budget on the host (before any capture) from measurements; see
`fused_moonvit.moonvit.attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import check_tensor, next_pow2
from .launch import launch_settings
from .limits import check_int
from ._rounding import dot, round_to

LOG2E = 1.4426950408889634

# Launch settings (see kernels/launch.py) beside the tiles, which `AttentionConfig` carries. The
# interpreter runs at most `program_cap` programs, each looping over its tiles: fewer are faster there.
VARLEN_ATTENTION_LAUNCH = [
    {"device_class": "cpu", "program_cap": 4},
    {"device_class": "sm90", "program_cap": None},
]
# `zero_padding_rows`: blocks of `block_rows` rows, `block_cols` columns a step, on any device.
ZERO_PADDING_ROWS_LAUNCH = [
    {"device_class": "cpu", "block_rows": 16, "block_cols": 256},
    {"device_class": "sm90", "block_rows": 16, "block_cols": 256},
]


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes of one launch: BLOCK_M query rows and BLOCK_N key rows per step."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Programs beyond cdiv(B, BLOCK_M) per head: they take the partial last blocks of the sequences.
    extra_programs: int = 4

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = check_int(f"AttentionConfig.{name}", getattr(self, name), 16)
            if value & (value - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two >= 16 (tl.dot), got {value}")
        check_int("AttentionConfig.num_warps", self.num_warps, 1)
        check_int("AttentionConfig.num_stages", self.num_stages, 1)
        check_int("AttentionConfig.extra_programs", self.extra_programs, 0)


@triton.jit
def _load_head(rows_ptr, live, d_main, d_tail, D: tl.constexpr, MAIN_MASKED: tl.constexpr,
               HAS_TAIL: tl.constexpr, ROWS_MASKED: tl.constexpr):
    # One head's (rows, D) block as a main part and a tail part (the tail is d_main itself when the head
    # has none; it is then never used). Without ROWS_MASKED every row is known to be live.
    main_cols = d_main < D
    if ROWS_MASKED:
        if MAIN_MASKED:
            main = tl.load(rows_ptr + d_main[None, :], mask=live[:, None] & main_cols[None, :], other=0.0)
        else:
            main = tl.load(rows_ptr + d_main[None, :], mask=live[:, None], other=0.0)
    else:
        if MAIN_MASKED:
            main = tl.load(rows_ptr + d_main[None, :], mask=main_cols[None, :], other=0.0)
        else:
            main = tl.load(rows_ptr + d_main[None, :])
    if HAS_TAIL:
        if ROWS_MASKED:
            tail = tl.load(rows_ptr + d_tail[None, :], mask=live[:, None] & (d_tail < D)[None, :], other=0.0)
        else:
            tail = tl.load(rows_ptr + d_tail[None, :], mask=(d_tail < D)[None, :], other=0.0)
    else:
        tail = main
    return main, tail


@triton.jit
def _store_head(rows_ptr, live, main, tail, d_main, d_tail, D: tl.constexpr, MAIN_MASKED: tl.constexpr,
                HAS_TAIL: tl.constexpr):
    if MAIN_MASKED:
        tl.store(rows_ptr + d_main[None, :], main, mask=live[:, None] & (d_main < D)[None, :])
    else:
        tl.store(rows_ptr + d_main[None, :], main, mask=live[:, None])
    if HAS_TAIL:
        tl.store(rows_ptr + d_tail[None, :], tail, mask=live[:, None] & (d_tail < D)[None, :])


@triton.jit
def _attend_block(q_main, q_tail, m_i, l_i, acc_main, acc_tail, k_base, v_base, n_start, end, qk_scale,
                  offs_n, d_main, d_tail, QKV_STRIDE: tl.constexpr, D: tl.constexpr, MAIN_MASKED: tl.constexpr,
                  HAS_TAIL: tl.constexpr, KEYS_MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    # One step of the online softmax over keys [n_start, n_start + BLOCK_N); only the sequence's last
    # block, which may run past its end, masks keys. The running max m_i is kept in log2 units of the
    # scaled scores, so each score costs one multiply-add before exp2.
    cols = n_start + offs_n
    col_live = cols < end
    offs = cols.to(tl.int64)[:, None] * QKV_STRIDE
    k_main, k_tail = _load_head(k_base + offs, col_live, d_main, d_tail, D, MAIN_MASKED, HAS_TAIL, KEYS_MASKED)
    qk = dot(q_main, tl.trans(k_main), tl.zeros((BLOCK_M, BLOCK_N), tl.float32))
    if HAS_TAIL:
        qk = dot(q_tail, tl.trans(k_tail), qk)
    if KEYS_MASKED:
        qk = tl.where(col_live[None, :], qk, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_main, v_tail = _load_head(v_base + offs, col_live, d_main, d_tail, D, MAIN_MASKED, HAS_TAIL, KEYS_MASKED)
    p = round_to(p, v_main.dtype)
    acc_main = dot(p, v_main, acc_main * alpha[:, None])
    if HAS_TAIL:
        acc_tail = dot(p, v_tail, acc_tail * alpha[:, None])
    return m_new, l_i, acc_main, acc_tail


@triton.jit
def _varlen_attention_kernel(
    qkv_ptr, out_ptr, cu_ptr, num_seqs, padding_seq, qk_scale,
    H: tl.constexpr, D: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    SEQS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    QKV_STRIDE: tl.constexpr = 3 * H * D
    OUT_STRIDE: tl.constexpr = H * D
    MAIN_MASKED: tl.constexpr = D_MAIN > D
    HAS_TAIL: tl.constexpr = D_TAIL > 0
    TAIL_WIDTH: tl.constexpr = D_TAIL if D_TAIL > 0 else D_MAIN
    head = tl.program_id(1)
    q_base = qkv_ptr + head * D
    k_base = qkv_ptr + (H + head) * D
    v_base = qkv_ptr + (2 * H + head) * D
    o_base = out_ptr + head * D
    out_dtype = out_ptr.dtype.element_ty

    d_main = tl.arange(0, D_MAIN)
    d_tail = D_MAIN + tl.arange(0, TAIL_WIDTH)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)

    # Query blocks per sequence, and the number of blocks before each: tile t belongs to the sequence
    # whose [before, before + blocks) holds t. Zero-length sequences own no tile.
    s = tl.arange(0, SEQS_POW2)
    s_live = s < num_seqs
    seq_starts = tl.load(cu_ptr + s, mask=s_live, other=0)
    seq_ends = tl.load(cu_ptr + s + 1, mask=s_live, other=0)
    blocks = tl.where(s_live, (seq_ends - seq_starts + BLOCK_M - 1) // BLOCK_M, 0)
    before = tl.cumsum(blocks, 0) - blocks
    total = tl.sum(blocks)

    for tile in range(tl.program_id(0), total, tl.num_programs(0)):
        owner = (before <= tile) & (tile < before + blocks)
        seq = tl.sum(tl.where(owner, s, 0))
        start = tl.sum(tl.where(owner, seq_starts, 0))
        end = tl.sum(tl.where(owner, seq_ends, 0))
        rows = start + (tile - tl.sum(tl.where(owner, before, 0))) * BLOCK_M + offs_m
        row_live = rows < end
        o_rows = o_base + rows.to(tl.int64)[:, None] * OUT_STRIDE
        if seq == padding_seq:
            # The plan's padding sequence: zeros, not attention.
            zero_main = tl.zeros((BLOCK_M, D_MAIN), out_dtype)
            zero_tail = tl.zeros((BLOCK_M, TAIL_WIDTH), out_dtype)
            _store_head(o_rows, row_live, zero_main, zero_tail, d_main, d_tail, D, MAIN_MASKED, HAS_TAIL)
        else:
            q_main, q_tail = _load_head(q_base + rows.to(tl.int64)[:, None] * QKV_STRIDE, row_live, d_main,
                                        d_tail, D, MAIN_MASKED, HAS_TAIL, True)
            m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc_main = tl.zeros((BLOCK_M, D_MAIN), tl.float32)
            acc_tail = tl.zeros((BLOCK_M, TAIL_WIDTH), tl.float32)
            full_end = start + (end - start) // BLOCK_N * BLOCK_N
            for n_start in range(start, full_end, BLOCK_N):
                m_i, l_i, acc_main, acc_tail = _attend_block(
                    q_main, q_tail, m_i, l_i, acc_main, acc_tail, k_base, v_base, n_start, end, qk_scale,
                    offs_n, d_main, d_tail, QKV_STRIDE, D, MAIN_MASKED, HAS_TAIL, False, BLOCK_M, BLOCK_N)
            if full_end < end:
                m_i, l_i, acc_main, acc_tail = _attend_block(
                    q_main, q_tail, m_i, l_i, acc_main, acc_tail, k_base, v_base, full_end, end, qk_scale,
                    offs_n, d_main, d_tail, QKV_STRIDE, D, MAIN_MASKED, HAS_TAIL, True, BLOCK_M, BLOCK_N)
            # A live row has at least its own key, so l_i >= 1; dead rows of the block are not stored.
            inv_l = 1.0 / tl.where(row_live, l_i, 1.0)
            _store_head(o_rows, row_live, round_to(acc_main * inv_l[:, None], out_dtype),
                        round_to(acc_tail * inv_l[:, None], out_dtype), d_main, d_tail, D, MAIN_MASKED, HAS_TAIL)


@triton.jit
def _zero_padding_rows_kernel(x_ptr, cu_ptr, padding_seq, rows, first_col, cols, stride,
                              BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # Blocks before the padding sequence return at once: the cost is the padding's rows, not the budget's.
    start = tl.load(cu_ptr + padding_seq)
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    if tl.program_id(0) * BLOCK_ROWS + BLOCK_ROWS > start:
        live = (r >= start) & (r < rows)
        ptrs = x_ptr + r.to(tl.int64)[:, None] * stride + first_col
        for c in range(0, cols, BLOCK_COLS):
            offs = c + tl.arange(0, BLOCK_COLS)
            tl.store(ptrs + offs[None, :], tl.zeros((BLOCK_ROWS, BLOCK_COLS), x_ptr.dtype.element_ty),
                     mask=live[:, None] & (offs < cols)[None, :])


def zero_padding_rows(x: torch.Tensor, cu_seqlens: torch.Tensor, first_col: int = 0) -> torch.Tensor:
    """Zeros, in place, columns first_col: of the rows of the plan's padding sequence (from
    cu_seqlens[-2] on), read on the device. Attention libraries that load a sequence's last key tile
    whole (FlashAttention-3's TMA loads) then read zeros, never the padding's leftovers, past each
    sequence's end."""
    check_tensor("x", x, dtypes=(torch.float32, torch.bfloat16, torch.float16), shape=(None, None))
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), shape=(None,), device=x.device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries (one sequence), got {cu_seqlens.numel()}")
    first_col = check_int("first_col", first_col, 0)
    if first_col > x.shape[1] or x.stride(1) != 1:
        raise ValueError(f"x must be row-major with at least first_col={first_col} columns, got {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    launch = launch_settings(ZERO_PADDING_ROWS_LAUNCH, _zero_padding_rows_kernel, x.device)
    block_rows = launch["block_rows"]
    _zero_padding_rows_kernel[(triton.cdiv(x.shape[0], block_rows),)](
        x, cu_seqlens, cu_seqlens.numel() - 2, x.shape[0], first_col, x.shape[1] - first_col, x.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_COLS=launch["block_cols"])
    return x


def _check(qkv, cu_seqlens, num_heads, head_dim, out):
    num_heads, head_dim = check_int("num_heads", num_heads, 1), check_int("head_dim", head_dim, 1)
    if head_dim % 8:
        # 8 elements are 16 bytes: every head then starts on a 16-byte boundary for wide loads.
        raise ValueError(f"head_dim must be a multiple of 8, got {head_dim}")
    check_tensor("qkv", qkv, dtypes=(torch.float32, torch.bfloat16, torch.float16),
                 shape=(None, 3 * num_heads * head_dim))
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), shape=(None,), device=qkv.device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries (one sequence), got {cu_seqlens.numel()}")
    if out is not None:
        check_tensor("out", out, dtypes=(qkv.dtype,), shape=(qkv.shape[0], num_heads * head_dim), device=qkv.device)


def head_split(head_dim: int) -> tuple[int, int]:
    """(main, tail) widths the kernel loads a head as: the largest power of two in the head dim (at least
    16, tl.dot's minimum), plus a power-of-two tail of at least 16 for the rest, or none. 72 -> (64, 16)."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    return main, 0 if rest <= 0 else max(16, next_pow2(rest))


def varlen_attention_fwd(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_heads: int,
    head_dim: int,
    *,
    pad_last: bool = True,
    config: AttentionConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention within each sequence of the packed (B, 3 * H * D) QKV output; returns (B, H * D).

    cu_seqlens: int32 (n + 1,) on qkv's device, 0 first and B last, non-decreasing (zero-length
        sequences are fine). It is read on the device only: no host sync, so it may change between
        replays of a captured graph.
    pad_last: the last sequence is the plan's padding sequence, whose rows are written as zeros.
    config: tile sizes (default: `AttentionConfig()`); choose them per budget, before capture.
    """
    _check(qkv, cu_seqlens, num_heads, head_dim, out)
    budget = qkv.shape[0]
    if out is None:
        out = torch.empty(budget, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    cfg = config or AttentionConfig()
    launch = launch_settings(VARLEN_ATTENTION_LAUNCH, _varlen_attention_kernel, qkv.device, head_dim=head_dim)
    num_seqs = cu_seqlens.numel() - 1
    d_main, d_tail = head_split(head_dim)
    programs = triton.cdiv(budget, cfg.block_m) + cfg.extra_programs
    if launch["program_cap"] is not None:
        programs = min(programs, launch["program_cap"])
    _varlen_attention_kernel[(programs, num_heads)](
        qkv, out, cu_seqlens, num_seqs, num_seqs - 1 if pad_last else -1, LOG2E / math.sqrt(head_dim),
        H=num_heads, D=head_dim, D_MAIN=d_main, D_TAIL=d_tail,
        SEQS_POW2=max(16, next_pow2(num_seqs)), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def varlen_attention_reference(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int, head_dim: int, *, pad_last: bool = True
) -> torch.Tensor:
    """Plain-PyTorch `varlen_attention_fwd`: SDPA per sequence in fp64, rounded once to qkv's dtype. Heads
    go a few at a time, so a 16384-patch sequence's fp64 scores (2 GiB a head) fit in memory."""
    _check(qkv, cu_seqlens, num_heads, head_dim, None)
    budget = qkv.shape[0]
    bounds = cu_seqlens.tolist()
    q, k, v = qkv.view(budget, 3, num_heads, head_dim).unbind(1)
    out = torch.zeros(budget, num_heads, head_dim, dtype=torch.float64, device=qkv.device)
    last = len(bounds) - 2
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start and not (pad_last and i == last):
            heads_at_once = max(1, 2**28 // (end - start) ** 2)
            for h in range(0, num_heads, heads_at_once):
                seq = [t[start:end, h:h + heads_at_once].double().transpose(0, 1) for t in (q, k, v)]
                out[start:end, h:h + heads_at_once] = F.scaled_dot_product_attention(*seq).transpose(0, 1)
    return out.reshape(budget, num_heads * head_dim).to(qkv.dtype)
