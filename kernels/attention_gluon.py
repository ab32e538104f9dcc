"""Block-diagonal attention over packed items for Hopper (sm90), written in Gluon: TMA loads, asynchronous
wgmma and a producer warp, the schedule FlashAttention-3 uses, with head dim 72 computed 80 wide.

Same contract as `fused_moonvit.kernels.attention.varlen_attention_fwd`: qkv is the packed (B, 3 * H * D)
QKV projection output (rows [Q | K | V], each head's D values contiguous), cu_seqlens (S + 2 entries,
int32, read on the device only) splits the rows into sequences, the last of which is the plan's padding
sequence, written as zeros and not attended; out is (B, H * D).

How the work is laid out, and why:
- qkv is seen by TMA as a (B, 3H, D) tensor, strides (3HD, D, 1), so one descriptor serves every head and
  each of q, k, v. A head is loaded as a 64- or 128-wide box plus, for head dims between, a 16-wide tail
  box whose columns past D lie outside the tensor: TMA fills them with zeros. So QK^T is 80 wide for head
  dim 72 (FlashAttention-3 rounds it to 96), and nothing from another head or row is ever read.
- One program per (query tile of one sequence, head), found from cu_seqlens alone, as the Triton kernel
  does. Its producer warp loads the query tile once and streams the sequence's key and value tiles
  through a ring of STAGES shared-memory buffers (full and empty mbarriers); its consumer warp groups
  (BLOCK_M / 64 of them, 64 query rows each) compute QK^T and P.V on the tensor cores asynchronously.
- OVERLAP issues the next tile's QK^T and this tile's P.V before the softmax that sits between them, so
  the softmax runs while the tensor cores work (FlashAttention-3's intra-warpgroup pipelining).
- Key rows past the sequence's end (only its last key tile reaches them) are masked out of the scores,
  and their value rows are zeroed in shared memory before P.V: P is 0 there, but 0 * NaN would still let
  a NaN from the next sequence in. So no sequence reads another's values, unlike FlashAttention-3.
- Softmax in fp32 with exp2, the scale folded into one multiply-add per score; P rounded to the input
  dtype for the second product; accumulators fp32; the output rounded once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_tensor, next_pow2
from ._gluon import (GLUON_MISSING, TensorDescriptor, cta_barrier, fence_async_shared, gl, gluon, mbarrier, tma_load,
                     warpgroup_mma, warpgroup_mma_wait)
from .attention import LOG2E, head_split
from .launch import device_class
from .limits import check_int


@dataclass(frozen=True)
class GluonAttentionConfig:
    """One launch's tiles: BLOCK_M query rows per program (64 or 128 per consumer warp group), BLOCK_N key
    rows per step, STAGES key/value buffers, OVERLAP the intra-warpgroup pipelining, GROUPS consumer warp
    groups."""

    # The defaults: FlashAttention-3's schedule (docs/design.md section 15).
    block_m: int = 128
    block_n: int = 128
    stages: int = 2
    overlap: bool = True
    # 1: one consumer partition of block_m / 16 warps; 2 or 3: partitions of one warp group (block_m / groups
    # rows each).
    groups: int = 2
    # With two or three groups and overlap: the warp groups take turns issuing their products
    # (FlashAttention-3's ping-pong), so one group's softmax runs under the others' products.
    pingpong: bool = True
    # With overlap: P goes to the second product through shared memory instead of registers (FlashAttention-3's
    # choice at head dims up to 96), so a warp group holds one P tile, not two (the serial schedule holds one
    # anyway and ignores it).
    p_shared: bool = True
    producer_regs: int = 24
    # None: the most that the consumer warp groups can take beside the producer's 24 (240 each for two, 160
    # for three: four warp groups share 65536 registers, 128 a thread on average).
    consumer_regs: int | None = None

    def __post_init__(self):
        # Warp groups of 64 query rows (or 128 in two steps of wgmma's 64), as one partition or one each.
        if check_int("GluonAttentionConfig.block_m", self.block_m, 64) not in (64, 128, 192, 256):
            raise ValueError(f"GluonAttentionConfig.block_m must be 64, 128, 192 or 256, got {self.block_m}")
        # Gluon's tensors have power-of-two sides; 256 keys of scores would not fit the registers.
        if check_int("GluonAttentionConfig.block_n", self.block_n, 16) not in (32, 64, 128):
            raise ValueError(f"GluonAttentionConfig.block_n must be 32, 64 or 128, got {self.block_n}")
        check_int("GluonAttentionConfig.stages", self.stages, 1)
        if (self.groups, self.block_m) not in ((1, 64), (1, 128), (2, 128), (2, 256), (3, 192)):
            raise ValueError(f"GluonAttentionConfig.groups must be 1 with block_m 64 or 128, 2 with block_m 128 "
                             f"or 256, or 3 with block_m 192, got {self.groups} with block_m {self.block_m}")
        if self.pingpong and not (self.groups > 1 and self.overlap):
            raise ValueError(f"GluonAttentionConfig.pingpong (on by default) needs groups 2 or 3 and overlap, got "
                             f"groups {self.groups} and overlap {self.overlap}; pass pingpong=False for this schedule")
        if self.groups == 3 and self.overlap and not self.p_shared and self.block_n > 64:
            raise ValueError(f"GluonAttentionConfig.groups 3 with overlap and block_n {self.block_n} needs "
                             f"p_shared=True, got p_shared=False: two 64 x {self.block_n} P tiles in registers do "
                             f"not fit a warp group's 160 registers (block_n 64 does)")
        check_int("GluonAttentionConfig.producer_regs", self.producer_regs, 24)
        if self.consumer_regs is not None:
            check_int("GluonAttentionConfig.consumer_regs", self.consumer_regs, 24)
        # Register budgets are per warp group: the consumers' and the producer's (one warp, a warp group's
        # budget) share 65536 registers, 512 a thread of four warp groups.
        if self.groups > 1 and self.groups * self.regs + self.producer_regs > 512:
            raise ValueError(f"GluonAttentionConfig.consumer_regs {self.regs} for {self.groups} consumer warp groups "
                             f"and producer_regs {self.producer_regs} exceed the register file "
                             f"({self.groups} * {self.regs} + {self.producer_regs} > 512)")

    @property
    def regs(self) -> int:
        """Registers a consumer thread gets (consumer_regs, or its default for the number of groups)."""
        if self.consumer_regs is not None:
            return self.consumer_regs
        return 160 if self.groups == 3 else 240

    @property
    def num_warps(self) -> int:
        # The default partition's warps: all consumers, or the first of two or three consumer warp groups.
        return 4 if self.groups > 1 else self.block_m // 16


def gluon_unavailable_reason(device: torch.device | str, head_dim: int | None = None) -> str | None:
    """Why the Gluon kernel cannot run on `device` (for `head_dim`, where given), or None."""
    if GLUON_MISSING is not None:
        return GLUON_MISSING
    device = torch.device(device)
    cls = device_class(device)
    if cls != "sm90":
        return f"the Gluon attention is built for Hopper (sm90) and has no interpreter; this is {cls}"
    if head_dim is not None and head_dim_unsupported(head_dim):
        return head_dim_unsupported(head_dim)
    return None


def config_unsupported(config: GluonAttentionConfig, head_dim: int) -> str | None:
    """Why `config` does not run at `head_dim`, or None. A warp group keeps its rows' output, in fp32, in
    its registers beside a score tile and P: 128 rows (block_m 256 in two groups) fit that up to head dim 80
    (80 wide) and spill at 128, and so do 64 rows in the 160 registers of three groups (block_m 192)."""
    reason = head_dim_unsupported(head_dim)
    if reason is None and config.block_m in (192, 256) and sum(head_split(head_dim)) > 80:
        reason = (f"GluonAttentionConfig block_m {config.block_m} ({config.block_m // config.groups} rows per warp "
                  f"group in {config.regs} registers) takes head dims up to 80, got {head_dim}: its output tile "
                  f"would not fit the registers; use block_m 128")
    return reason


def head_dim_unsupported(head_dim: int) -> str | None:
    """Why the kernel does not take `head_dim`, or None: a head is one 64- or 128-wide box plus at most a
    16-wide tail, so 64, 72, 80 and 128 run."""
    if head_dim % 8 == 0 and head_split(head_dim) in ((64, 0), (64, 16), (128, 0)):
        return None
    return f"the Gluon attention takes head dims 64, 72, 80 and 128, got {head_dim}"


if gluon is not None:

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _producer(q_main_desc, q_tail_desc, kv_main_desc, kv_tail_desc, q_main, q_tail, k_main, k_tail, v_main,
                  v_tail, q_bar, k_full, v_full, k_empty, v_empty, row0, start, n_tiles, head,
                  H: gl.constexpr, D_MAIN: gl.constexpr, HAS_TAIL: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, GROUPS: gl.constexpr):
        # The query tile comes as one box per consumer group (192 rows would be no power of two).
        GROUP_M: gl.constexpr = q_main_desc.block_type.shape[0]
        Q_BYTES: gl.constexpr = GROUPS * (q_main_desc.block_type.nbytes
                                          + (q_tail_desc.block_type.nbytes if HAS_TAIL else 0))
        KV_BYTES: gl.constexpr = kv_main_desc.block_type.nbytes + (kv_tail_desc.block_type.nbytes if HAS_TAIL else 0)
        if n_tiles > 0:
            mbarrier.expect(q_bar, Q_BYTES)
            for g in gl.static_range(GROUPS):
                tma_load(q_main_desc, [row0 + g * GROUP_M, head, 0], q_bar, q_main.index(g))
                if HAS_TAIL:
                    tma_load(q_tail_desc, [row0 + g * GROUP_M, head, D_MAIN], q_bar, q_tail.index(g))
        for j in range(n_tiles):
            s = j % STAGES
            # A fresh barrier counts as having completed the phase before its first: the first pass
            # through the ring does not wait.
            empty_phase = ((j // STAGES) & 1) ^ 1
            row = start + j * BLOCK_N
            # Keys and values are freed separately: with OVERLAP a key buffer is done a whole step before
            # the value buffer of the same tile, and its next tile can load in that step.
            mbarrier.wait(k_empty.index(s), empty_phase)
            mbarrier.expect(k_full.index(s), KV_BYTES)
            tma_load(kv_main_desc, [row, H + head, 0], k_full.index(s), k_main.index(s))
            if HAS_TAIL:
                tma_load(kv_tail_desc, [row, H + head, D_MAIN], k_full.index(s), k_tail.index(s))
            mbarrier.wait(v_empty.index(s), empty_phase)
            mbarrier.expect(v_full.index(s), KV_BYTES)
            tma_load(kv_main_desc, [row, 2 * H + head, 0], v_full.index(s), v_main.index(s))
            if HAS_TAIL:
                tma_load(kv_tail_desc, [row, 2 * H + head, D_MAIN], v_full.index(s), v_tail.index(s))

    @gluon.jit
    def _scores(q_main, q_tail, k_main, k_tail, s, s_layout: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, D_MAIN: gl.constexpr, TAIL: gl.constexpr, HAS_TAIL: gl.constexpr):
        # QK^T of key buffer s, issued (not waited for): one or two wgmma groups.
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = warpgroup_mma(q_main, k_main.index(s).reshape([BLOCK_N, D_MAIN]).permute((1, 0)), acc,
                            use_acc=False, is_async=True)
        if HAS_TAIL:
            acc = warpgroup_mma(q_tail, k_tail.index(s).reshape([BLOCK_N, TAIL]).permute((1, 0)), acc,
                                is_async=True)
        return acc

    @gluon.jit
    def _online_softmax(sc, m_i, l_i, qk_scale, cols, keep, masked, dtype: gl.constexpr):
        # One step of the online softmax over a score tile: the row maximum kept in log2 units of the scaled
        # scores (one multiply-add a score before exp2); `masked` drops the columns from `keep` on, where the
        # sequence's last tile runs past its end. Returns P already rounded for the second product (so the
        # issue of that product is wgmma instructions only), the new maximum and sum, and the rescale factor.
        if masked:
            sc = gl.where((cols < keep)[None, :], sc, -float("inf"))
        m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(sc * qk_scale - m_new[:, None])
        return p.to(dtype), m_new, l_i * alpha + gl.sum(p, 1), alpha

    @gluon.jit
    def _issue_values(p16, p_buf, acc, acc_t, v_main, v_tail, s, p_layout: gl.constexpr, pt_layout: gl.constexpr,
                      BLOCK_N: gl.constexpr, D_MAIN: gl.constexpr, TAIL: gl.constexpr, HAS_TAIL: gl.constexpr,
                      P_SHARED: gl.constexpr):
        # P.V of value buffer s, issued (not waited for); P goes to the tensor cores from registers, or from
        # p_buf where P_SHARED.
        if P_SHARED:
            acc = warpgroup_mma(p_buf, v_main.index(s).reshape([BLOCK_N, D_MAIN]), acc, is_async=True)
            if HAS_TAIL:
                acc_t = warpgroup_mma(p_buf, v_tail.index(s).reshape([BLOCK_N, TAIL]), acc_t, is_async=True)
        else:
            acc = warpgroup_mma(gl.convert_layout(p16, p_layout), v_main.index(s).reshape([BLOCK_N, D_MAIN]), acc,
                                is_async=True)
            if HAS_TAIL:
                acc_t = warpgroup_mma(gl.convert_layout(p16, pt_layout), v_tail.index(s).reshape([BLOCK_N, TAIL]),
                                      acc_t, is_async=True)
        return acc, acc_t

    @gluon.jit
    def _stage_p(p16, p_buf, P_SHARED: gl.constexpr):
        # P into shared memory for the second product, once the previous one has read it: wgmma then reads
        # no register that the softmax writes, so nothing makes the compiler wait for it early.
        if P_SHARED:
            p_buf.store(p16)
            fence_async_shared()
            cta_barrier()

    @gluon.jit
    def _wait_values(acc, acc_t, after, HAS_TAIL: gl.constexpr):
        # Waits for P.V. `after` (the softmax's P) goes through the wait as a dependency: without it ptxas
        # hoists the wait above the softmax that should run under P.V, and the two run in series.
        if HAS_TAIL:
            acc, acc_t, after = warpgroup_mma_wait(0, deps=(acc, acc_t, after))
        else:
            acc, after = warpgroup_mma_wait(0, deps=(acc, after))
        return acc, acc_t, after

    @gluon.jit
    def _rescale(acc, acc_t, alpha, row_o: gl.constexpr, row_t: gl.constexpr, HAS_TAIL: gl.constexpr):
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        if HAS_TAIL:
            acc_t = acc_t * gl.convert_layout(alpha, row_t)[:, None]
        return acc, acc_t

    @gluon.jit
    def _take_turn(turn, count, GROUP: gl.constexpr, PINGPONG: gl.constexpr):
        # Ping-pong: warp group GROUP issues its count-th set of products only after the group before it in
        # the ring issued its count-th (group 0: the last group its previous), so the tensor cores run the
        # others' products while a group does its softmax. Turns go round strictly, so a barrier is never
        # more than one phase ahead of its waiter and parity suffices; group 0 goes first (a fresh barrier
        # passes a wait on parity 1).
        if PINGPONG:
            mbarrier.wait(turn.index(GROUP), (count & 1) ^ (1 if GROUP == 0 else 0))

    @gluon.jit
    def _pass_turn(turn, GROUP: gl.constexpr, GROUPS: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index((GROUP + 1) % GROUPS))

    @gluon.jit
    def _zero_value_rows(v_main, v_tail, s, keep, BLOCK_N: gl.constexpr, D_MAIN: gl.constexpr,
                         TAIL: gl.constexpr, HAS_TAIL: gl.constexpr, num_warps: gl.constexpr):
        # Value rows [keep, BLOCK_N) of buffer s belong to the next sequence (or past the tensor): zero them
        # before P.V reads them, so a NaN there cannot reach this sequence through 0 * NaN. Both consumer
        # groups may do this to the same buffer: they write the same zeros and leave the other rows alone.
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        main = v_main.index(s).reshape([BLOCK_N, D_MAIN])
        vals = main.load(layout)
        main.store(gl.where((rows < keep)[:, None], vals, gl.zeros_like(vals)))
        if HAS_TAIL:
            tail_layout: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [num_warps, 1], [1, 0])
            tail_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, tail_layout))
            tail = v_tail.index(s).reshape([BLOCK_N, TAIL])
            tvals = tail.load(tail_layout)
            tail.store(gl.where((tail_rows < keep)[:, None], tvals, gl.zeros_like(tvals)))
        fence_async_shared()
        cta_barrier()

    @gluon.jit
    def _consumer(q_main, q_tail, k_main, k_tail, v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty, turn,
                  p_bufs, out_ptr, row0, start, end, n_tiles, head, qk_scale,
                  H: gl.constexpr, D: gl.constexpr, D_MAIN: gl.constexpr, TAIL: gl.constexpr,
                  HAS_TAIL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  OVERLAP: gl.constexpr, GROUP: gl.constexpr, GROUPS: gl.constexpr, PINGPONG: gl.constexpr,
                  P_SHARED: gl.constexpr, num_warps: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D_MAIN, 16])
        t_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, TAIL, 16])
        dtype: gl.constexpr = q_main.dtype
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        pt_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=t_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        row_t: gl.constexpr = gl.SliceLayout(1, t_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        # This partition's BLOCK_M rows of the query tile, and its P buffer.
        q_off: gl.constexpr = GROUP * BLOCK_M
        p_buf = p_bufs.index(GROUP)

        acc = gl.zeros([BLOCK_M, D_MAIN], gl.float32, o_layout)
        acc_t = gl.zeros([BLOCK_M, TAIL], gl.float32, t_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        if n_tiles > 0:
            qm = q_main.index(GROUP).reshape([BLOCK_M, D_MAIN])
            qt = q_tail.index(GROUP).reshape([BLOCK_M, TAIL])
            mbarrier.wait(q_bar, 0)
            m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_s)
            last = n_tiles - 1
            # Keys of the last tile that belong to this sequence (BLOCK_N when it ends on a tile).
            last_keep = end - start - last * BLOCK_N
            if OVERLAP:
                mbarrier.wait(k_full.index(0), 0)
                _take_turn(turn, 0, GROUP, PINGPONG)
                sc = _scores(qm, qt, k_main, k_tail, 0, s_layout, BLOCK_M, BLOCK_N, D_MAIN, TAIL, HAS_TAIL)
                _pass_turn(turn, GROUP, GROUPS, PINGPONG)
                sc = warpgroup_mma_wait(0, deps=(sc,))
                mbarrier.arrive(k_empty.index(0))
                if last == 0:
                    sc = gl.where((cols < last_keep)[None, :], sc, -float("inf"))
                # The first tile: nothing to rescale yet.
                m_i = gl.max(sc, 1) * qk_scale
                p = gl.exp2(sc * qk_scale - m_i[:, None])
                l_i = gl.sum(p, 1)
                p16 = p.to(dtype)
                _stage_p(p16, p_buf, P_SHARED)
                mbarrier.wait(v_full.index(0), 0)
                for j in range(1, n_tiles):
                    s = j % STAGES
                    prev = (j - 1) % STAGES
                    mbarrier.wait(k_full.index(s), (j // STAGES) & 1)
                    # The next tile's QK^T and this tile's P.V go to the tensor cores together; the softmax
                    # between them runs while P.V does.
                    _take_turn(turn, j, GROUP, PINGPONG)
                    sc = _scores(qm, qt, k_main, k_tail, s, s_layout, BLOCK_M, BLOCK_N, D_MAIN, TAIL, HAS_TAIL)
                    acc, acc_t = _issue_values(p16, p_buf, acc, acc_t, v_main, v_tail, prev, p_layout, pt_layout,
                                               BLOCK_N, D_MAIN, TAIL, HAS_TAIL, P_SHARED)
                    _pass_turn(turn, GROUP, GROUPS, PINGPONG)
                    # Wait for QK^T only: P.V (one or two groups, issued after it) stays in flight.
                    sc = warpgroup_mma_wait(2 if HAS_TAIL else 1, deps=(sc,))
                    mbarrier.arrive(k_empty.index(s))
                    p16, m_i, l_i, alpha = _online_softmax(sc, m_i, l_i, qk_scale, cols, last_keep, j == last, dtype)
                    # The next step's values, waited for here: the barrier's polling loop ends the block that
                    # holds the softmax, and ptxas keeps the wait for P.V below it (within one block it hoists
                    # that wait above the softmax, which puts the two in series).
                    mbarrier.wait(v_full.index(s), (j // STAGES) & 1)
                    acc, acc_t, p16 = _wait_values(acc, acc_t, p16, HAS_TAIL)
                    mbarrier.arrive(v_empty.index(prev))
                    _stage_p(p16, p_buf, P_SHARED)
                    acc, acc_t = _rescale(acc, acc_t, alpha, row_o, row_t, HAS_TAIL)
                s = last % STAGES
                if last_keep < BLOCK_N:
                    _zero_value_rows(v_main, v_tail, s, last_keep, BLOCK_N, D_MAIN, TAIL, HAS_TAIL, num_warps)
                _take_turn(turn, n_tiles, GROUP, PINGPONG)
                acc, acc_t = _issue_values(p16, p_buf, acc, acc_t, v_main, v_tail, s, p_layout, pt_layout, BLOCK_N, D_MAIN,
                                           TAIL, HAS_TAIL, P_SHARED)
                _pass_turn(turn, GROUP, GROUPS, PINGPONG)
                acc, acc_t, p16 = _wait_values(acc, acc_t, p16, HAS_TAIL)
                mbarrier.arrive(v_empty.index(s))
            else:
                for j in range(n_tiles):
                    s = j % STAGES
                    phase = (j // STAGES) & 1
                    mbarrier.wait(k_full.index(s), phase)
                    sc = _scores(qm, qt, k_main, k_tail, s, s_layout, BLOCK_M, BLOCK_N, D_MAIN, TAIL, HAS_TAIL)
                    sc = warpgroup_mma_wait(0, deps=(sc,))
                    mbarrier.arrive(k_empty.index(s))
                    p16, m_i, l_i, alpha = _online_softmax(sc, m_i, l_i, qk_scale, cols, last_keep, j == last, dtype)
                    acc, acc_t = _rescale(acc, acc_t, alpha, row_o, row_t, HAS_TAIL)
                    mbarrier.wait(v_full.index(s), phase)
                    if j == last:
                        if last_keep < BLOCK_N:
                            _zero_value_rows(v_main, v_tail, s, last_keep, BLOCK_N, D_MAIN, TAIL, HAS_TAIL,
                                             num_warps)
                    acc, acc_t = _issue_values(p16, p_buf, acc, acc_t, v_main, v_tail, s, p_layout, pt_layout, BLOCK_N,
                                               D_MAIN, TAIL, HAS_TAIL, P_SHARED)
                    acc, acc_t, p16 = _wait_values(acc, acc_t, p16, HAS_TAIL)
                    mbarrier.arrive(v_empty.index(s))
        # Live rows have at least their own key, so l >= 1; the padding sequence (n_tiles == 0) stores zeros.
        inv = gl.where(l_i > 0, 1.0 / l_i, gl.zeros_like(l_i))
        rows = row0 + q_off + gl.arange(0, BLOCK_M, layout=row_o)
        o_cols = gl.arange(0, D_MAIN, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = out_ptr + rows.to(gl.int64)[:, None] * (H * D) + head * D + o_cols[None, :]
        o_mask = (rows < end)[:, None] & (o_cols < D)[None, :]
        gl.store(o_ptrs, (acc * gl.convert_layout(inv, row_o)[:, None]).to(dtype), mask=o_mask)
        if HAS_TAIL:
            t_rows = row0 + q_off + gl.arange(0, BLOCK_M, layout=row_t)
            t_cols = D_MAIN + gl.arange(0, TAIL, layout=gl.SliceLayout(0, t_layout))
            t_ptrs = out_ptr + t_rows.to(gl.int64)[:, None] * (H * D) + head * D + t_cols[None, :]
            t_mask = (t_rows < end)[:, None] & (t_cols < D)[None, :]
            gl.store(t_ptrs, (acc_t * gl.convert_layout(inv, row_t)[:, None]).to(dtype), mask=t_mask)

    @gluon.jit
    def _gluon_attention_kernel(q_main_desc, q_tail_desc, kv_main_desc, kv_tail_desc, out_ptr, cu_ptr, num_seqs,
                                padding_seq, qk_scale,
                                H: gl.constexpr, D: gl.constexpr, D_MAIN: gl.constexpr, D_TAIL: gl.constexpr,
                                SEQS_POW2: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                STAGES: gl.constexpr, OVERLAP: gl.constexpr, GROUPS: gl.constexpr,
                                PINGPONG: gl.constexpr, P_SHARED: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        HAS_TAIL: gl.constexpr = D_TAIL > 0
        TAIL: gl.constexpr = D_TAIL if D_TAIL > 0 else 16
        # Rows each consumer partition takes: the whole tile in one partition (GROUPS == 1), or 64 rows in
        # each of GROUPS partitions of one warp group, which then wait on and free buffers independently.
        GROUP_M: gl.constexpr = BLOCK_M // GROUPS
        tile = gl.program_id(0)
        head = gl.program_id(1)

        # Query tiles per sequence and the tiles before each: this program's tile belongs to the sequence
        # whose [before, before + blocks) holds it. Zero-length sequences own no tile.
        seq_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        s_idx = gl.arange(0, SEQS_POW2, layout=seq_layout)
        s_live = s_idx < num_seqs
        seq_starts = gl.load(cu_ptr + s_idx, mask=s_live, other=0)
        seq_ends = gl.load(cu_ptr + s_idx + 1, mask=s_live, other=0)
        blocks = gl.where(s_live, (seq_ends - seq_starts + BLOCK_M - 1) // BLOCK_M, 0)
        before = gl.associative_scan(blocks, 0, _add) - blocks
        owner = (before <= tile) & (tile < before + blocks)
        seq = gl.sum(gl.where(owner, s_idx, 0), 0)
        start = gl.sum(gl.where(owner, seq_starts, 0), 0)
        end = gl.sum(gl.where(owner, seq_ends, 0), 0)
        row0 = start + (tile - gl.sum(gl.where(owner, before, 0), 0)) * BLOCK_M
        # Programs past the last tile own no rows (start == end == 0); the padding sequence attends nothing.
        n_tiles = gl.where(seq == padding_seq, 0, (end - start + BLOCK_N - 1) // BLOCK_N)

        dtype: gl.constexpr = kv_main_desc.dtype
        # Head dims without a tail get one-slot tail buffers, never loaded or read.
        TAIL_SLOTS: gl.constexpr = STAGES if HAS_TAIL else 1
        q_main = gl.allocate_shared_memory(dtype, [GROUPS] + q_main_desc.block_type.shape, q_main_desc.layout)
        q_tail = gl.allocate_shared_memory(dtype, [GROUPS] + q_tail_desc.block_type.shape, q_tail_desc.layout)
        k_main = gl.allocate_shared_memory(dtype, [STAGES] + kv_main_desc.block_type.shape, kv_main_desc.layout)
        v_main = gl.allocate_shared_memory(dtype, [STAGES] + kv_main_desc.block_type.shape, kv_main_desc.layout)
        k_tail = gl.allocate_shared_memory(dtype, [TAIL_SLOTS] + kv_tail_desc.block_type.shape, kv_tail_desc.layout)
        v_tail = gl.allocate_shared_memory(dtype, [TAIL_SLOTS] + kv_tail_desc.block_type.shape, kv_tail_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # One turn barrier per consumer group, rounded up to a power of two.
        TURNS: gl.constexpr = 4 if GROUPS == 3 else 2
        turn = gl.allocate_shared_memory(gl.int64, [TURNS, 1], mbarrier.MBarrierLayout())
        # Each consumer group's P tile where P_SHARED (a stand-in of one 64 x 16 tile otherwise).
        P_IN_SMEM: gl.constexpr = P_SHARED and OVERLAP
        P_ROWS: gl.constexpr = GROUP_M if P_IN_SMEM else 64
        P_COLS: gl.constexpr = BLOCK_N if P_IN_SMEM else 16
        p_bufs = gl.allocate_shared_memory(dtype, [GROUPS if P_IN_SMEM else 1, P_ROWS, P_COLS],
                                           gl.NVMMASharedLayout.get_default_for([P_ROWS, P_COLS], dtype))
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=GROUPS)
            mbarrier.init(v_empty.index(i), count=GROUPS)
        for i in gl.static_range(TURNS):
            mbarrier.init(turn.index(i), count=1)

        # Each partition's arguments but its group: consumers, then the producer.
        if GROUPS == 1:
            gl.warp_specialize([
                (_consumer, (q_main, q_tail, k_main, k_tail, v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty,
                             turn, p_bufs, out_ptr, row0, start, end, n_tiles, head, qk_scale, H, D, D_MAIN, TAIL,
                             HAS_TAIL, GROUP_M, BLOCK_N, STAGES, OVERLAP, 0, 1, False, P_IN_SMEM, num_warps)),
                (_producer, (q_main_desc, q_tail_desc, kv_main_desc, kv_tail_desc, q_main, q_tail, k_main, k_tail,
                             v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty, row0, start, n_tiles, head, H,
                             D_MAIN, HAS_TAIL, BLOCK_N, STAGES, 1)),
            ], [1], [PRODUCER_REGS])
        elif GROUPS == 2:
            gl.warp_specialize([
                (_consumer, (q_main, q_tail, k_main, k_tail, v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty,
                             turn, p_bufs, out_ptr, row0, start, end, n_tiles, head, qk_scale, H, D, D_MAIN, TAIL,
                             HAS_TAIL, GROUP_M, BLOCK_N, STAGES, OVERLAP, 0, 2, PINGPONG, P_IN_SMEM, num_warps)),
                (_consumer, (q_main, q_tail, k_main, k_tail, v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty,
                             turn, p_bufs, out_ptr, row0, start, end, n_tiles, head, qk_scale, H, D, D_MAIN, TAIL,
                             HAS_TAIL, GROUP_M, BLOCK_N, STAGES, OVERLAP, 1, 2, PINGPONG, P_IN_SMEM, 4)),
                (_producer, (q_main_desc, q_tail_desc, kv_main_desc, kv_tail_desc, q_main, q_tail, k_main, k_tail,
                             v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty, row0, start, n_tiles, head, H,
                             D_MAIN, HAS_TAIL, BLOCK_N, STAGES, 2)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (q_main, q_tail, k_main, k_tail, v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty,
                             turn, p_bufs, out_ptr, row0, start, end, n_tiles, head, qk_scale, H, D, D_MAIN, TAIL,
                             HAS_TAIL, GROUP_M, BLOCK_N, STAGES, OVERLAP, 0, 3, PINGPONG, P_IN_SMEM, num_warps)),
                (_consumer, (q_main, q_tail, k_main, k_tail, v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty,
                             turn, p_bufs, out_ptr, row0, start, end, n_tiles, head, qk_scale, H, D, D_MAIN, TAIL,
                             HAS_TAIL, GROUP_M, BLOCK_N, STAGES, OVERLAP, 1, 3, PINGPONG, P_IN_SMEM, 4)),
                (_consumer, (q_main, q_tail, k_main, k_tail, v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty,
                             turn, p_bufs, out_ptr, row0, start, end, n_tiles, head, qk_scale, H, D, D_MAIN, TAIL,
                             HAS_TAIL, GROUP_M, BLOCK_N, STAGES, OVERLAP, 2, 3, PINGPONG, P_IN_SMEM, 4)),
                (_producer, (q_main_desc, q_tail_desc, kv_main_desc, kv_tail_desc, q_main, q_tail, k_main, k_tail,
                             v_main, v_tail, q_bar, k_full, v_full, k_empty, v_empty, row0, start, n_tiles, head, H,
                             D_MAIN, HAS_TAIL, BLOCK_N, STAGES, 3)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


def _descriptor(qkv3: torch.Tensor, rows: int, width: int) -> TensorDescriptor:
    # (rows, 1, width) boxes of the (B, 3H, D) view; columns past D come back as zeros.
    block = [rows, 1, width]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if qkv3.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(qkv3, list(qkv3.shape), list(qkv3.stride()), block, layout)


def gluon_attention_fwd(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int, head_dim: int, *,
                        config: GluonAttentionConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`varlen_attention_fwd`'s contract (the last sequence of cu_seqlens is the plan's padding) on the Gluon
    kernel: bf16 or fp16 qkv on a Hopper GPU. Capturable: cu_seqlens is read on the device only."""
    num_heads, head_dim = check_int("num_heads", num_heads, 1), check_int("head_dim", head_dim, 1)
    check_tensor("qkv", qkv, dtypes=(torch.bfloat16, torch.float16), shape=(None, 3 * num_heads * head_dim))
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), shape=(None,), device=qkv.device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries (one sequence), got {cu_seqlens.numel()}")
    reason = gluon_unavailable_reason(qkv.device, head_dim)
    if reason is not None:
        raise RuntimeError(reason)
    budget = qkv.shape[0]
    if out is None:
        out = torch.empty(budget, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    else:
        check_tensor("out", out, dtypes=(qkv.dtype,), shape=(budget, num_heads * head_dim), device=qkv.device)
    cfg = config or GluonAttentionConfig()
    reason = config_unsupported(cfg, head_dim)
    if reason is not None:
        raise ValueError(reason)
    d_main, d_tail = head_split(head_dim)
    qkv3 = qkv.view(budget, 3 * num_heads, head_dim)
    tail_width = d_tail or 16
    num_seqs = cu_seqlens.numel() - 1
    # The query tile is loaded as one box per consumer group.
    group_m = cfg.block_m // cfg.groups
    # Every sequence's partial last tile can add one tile to cdiv(B, BLOCK_M).
    grid = (math.ceil(budget / cfg.block_m) + num_seqs, num_heads)
    _gluon_attention_kernel[grid](
        _descriptor(qkv3, group_m, d_main), _descriptor(qkv3, group_m, tail_width),
        _descriptor(qkv3, cfg.block_n, d_main), _descriptor(qkv3, cfg.block_n, tail_width),
        out, cu_seqlens, num_seqs, num_seqs - 1, LOG2E / math.sqrt(head_dim),
        H=num_heads, D=head_dim, D_MAIN=d_main, D_TAIL=d_tail, SEQS_POW2=max(32, next_pow2(num_seqs)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.stages, OVERLAP=cfg.overlap, GROUPS=cfg.groups,
        PINGPONG=cfg.pingpong, P_SHARED=cfg.p_shared, PRODUCER_REGS=cfg.producer_regs, CONSUMER_REGS=cfg.regs,
        num_warps=cfg.num_warps)
    return out


def compile_for_sm90(num_heads: int, head_dim: int, config: GluonAttentionConfig | None = None,
                     dtype: torch.dtype = torch.bfloat16, max_items: int = 64):
    """The kernel compiled for sm_90a (PTX and cubin) without a GPU: Triton's compiler and ptxas run on any
    host, so CPU-only machines can check that it builds under their Triton and read its resources. Not in a
    process that runs kernels under the Triton interpreter (TRITON_INTERPRET=1), which wraps the kernel's
    helpers for interpretation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    if GLUON_MISSING is not None:
        raise RuntimeError(GLUON_MISSING)
    cfg = config or GluonAttentionConfig()
    reason = config_unsupported(cfg, head_dim)
    if reason is not None:
        raise ValueError(reason)
    d_main, d_tail = head_split(head_dim)
    # Host tensors stand in for the GPU's: only their dtypes, shapes and strides reach the compiler.
    qkv3 = torch.empty(cfg.block_m, 3 * num_heads, head_dim, dtype=dtype)
    descs = [_descriptor(qkv3, rows, width) for rows in (cfg.block_m // cfg.groups, cfg.block_n)
             for width in (d_main, d_tail or 16)]
    pointers = [torch.empty(1, dtype=dtype), torch.empty(1, dtype=torch.int32)]
    runtime = [mangle_type(a) for a in descs + pointers]
    names = [p.name for p in _gluon_attention_kernel.params]
    signature = dict(zip(names, runtime + ["i32", "i32", "fp32"]))
    constexprs = dict(H=num_heads, D=head_dim, D_MAIN=d_main, D_TAIL=d_tail, SEQS_POW2=max(32, next_pow2(max_items + 1)),
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.stages, OVERLAP=cfg.overlap,
                      GROUPS=cfg.groups, PINGPONG=cfg.pingpong, P_SHARED=cfg.p_shared, PRODUCER_REGS=cfg.producer_regs,
                      CONSUMER_REGS=cfg.regs, num_warps=cfg.num_warps)
    signature.update({name: "constexpr" for name in constexprs})
    source = GluonASTSource(_gluon_attention_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
