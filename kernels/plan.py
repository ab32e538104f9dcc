"""The per-call plan: which rows of a budget of B patch tokens belong to which item.

An item is an image, (t = 1, h, w) patches, or a video chunk of t frames of h x w patches (MoonViT3d),
its patches frame-major, each frame row-major. Its tokens attend to each other (all t * h * w of them),
and its t frames are averaged, per position, before the 2x2 merge, so it yields h/2 * w/2 merged tokens.

Host side, once per call and O(items): `build_plan` turns the call's `Items` (kernels/items.py) into one
small int32 table whose size depends only on the number of sequence slots S, so a CUDA graph captured for
(B, S) can replay any batch that fits. `upload_plan` copies it into a preallocated device buffer with one non-blocking H2D
copy.

Device side, inside the graph: `expand_plan` (one small Triton kernel, no host sync, no data-dependent
shape) expands the table into per-token metadata that the position-embedding, RoPE and merge kernels
read directly, so none of them searches `cu_seqlens` itself.

Plan layout (flat int32, `plan_numel(S) = 6 * S + 3` entries):

    [0, S + 2)           cu_seqlens: 0, then the running patch count after each slot, then B.
                         Unused slots repeat the total (zero-length sequences); the last sequence,
                         [total, B), is the padding sequence. Every row 0..B-1 belongs to exactly one
                         sequence, so varlen attention over S + 1 sequences never reads undefined rows.
    [S + 2, 2 * S + 3)   cu_outputs: 0, then the running merged-token count (h/2 * w/2 per item) after
                         each slot; unused slots repeat the total.
    [2 * S + 3, 6 * S + 3)
                         items, (S, 4) row-major: patch offset, t, h, w. Unused slots hold (total, 0, 0, 0).

Token metadata layout (`token_meta`, int32 (META_ROWS, B), one row per field):

    META_ITEM         item slot of token x, or -1 for a padding token
    META_ROW           patch row of token x inside its frame (0 for padding)
    META_COL           patch column of token x inside its frame (0 for padding)
    META_HEIGHT        h of the token's item (0 for padding)
    META_WIDTH         w of the token's item (0 for padding)
    META_TIME          1 + the row of the time embedding token x adds: f + 1 for frame f of an item of
                       t > 1 frames; 0 (none) for images (t = 1) and padding
    META_MERGE_SRC     for o < B / 4: row of the (0, 0) sub-token, in frame 0, of merged output token o,
                       or -1 if o is padding; -1 for o >= B / 4
    META_MERGE_WIDTH   for o < B / 4: w of the item of merged token o (the row stride between its (0, x)
                       and (1, x) sub-tokens), or 0; 0 for o >= B / 4
    META_MERGE_FRAMES  for o < B / 4: t of the item of merged token o (the frames averaged), or 0
    META_MERGE_STRIDE  for o < B / 4: h * w of that item (the row stride between frames), or 0

Merged tokens are laid out item after item, each row-major over its (h/2, w/2) grid, so at most
B / 4 of them exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import numpy as np
import torch
import triton
import triton.language as tl

from ._checks import check_tensor
from .items import Items
from .launch import launch_settings
from .limits import MERGE_PATCHES, check_budget, check_int

ITEM_FIELDS = 4

META_ITEM = 0
META_ROW = 1
META_COL = 2
META_HEIGHT = 3
META_WIDTH = 4
META_TIME = 5
META_MERGE_SRC = 6
META_MERGE_WIDTH = 7
META_MERGE_FRAMES = 8
META_MERGE_STRIDE = 9
META_ROWS = 10

# Triton kernels may read module globals only when they are constexpr objects.
_ITEM_FIELDS = tl.constexpr(ITEM_FIELDS)
_ITEM = tl.constexpr(META_ITEM)
_ROW = tl.constexpr(META_ROW)
_COL = tl.constexpr(META_COL)
_HEIGHT = tl.constexpr(META_HEIGHT)
_WIDTH = tl.constexpr(META_WIDTH)
_TIME = tl.constexpr(META_TIME)
_MERGE_SRC = tl.constexpr(META_MERGE_SRC)
_MERGE_WIDTH = tl.constexpr(META_MERGE_WIDTH)
_MERGE_FRAMES = tl.constexpr(META_MERGE_FRAMES)
_MERGE_STRIDE = tl.constexpr(META_MERGE_STRIDE)


def plan_numel(max_items: int) -> int:
    """Number of int32 entries in the plan for `max_items` sequence slots."""
    return (max_items + 2) + (max_items + 1) + ITEM_FIELDS * max_items


def plan_max_items(plan: torch.Tensor) -> int:
    """The slot count S a plan (host or device) was built for, from its size alone."""
    n = plan.numel()
    if n < plan_numel(1) or (n - 3) % (ITEM_FIELDS + 2):
        raise ValueError(f"plan must have 6 * S + 3 entries for some S >= 1, got {n}")
    return (n - 3) // (ITEM_FIELDS + 2)


def plan_cu_seqlens(plan: torch.Tensor) -> torch.Tensor:
    """The (S + 2,) int32 cu_seqlens view of a plan: S item slots, then the padding sequence."""
    return plan[: plan_max_items(plan) + 2]


def plan_cu_outputs(plan: torch.Tensor) -> torch.Tensor:
    """The (S + 1,) int32 running merged-token counts of a plan."""
    s = plan_max_items(plan)
    return plan[s + 2 : 2 * s + 3]


def plan_items(plan: torch.Tensor) -> torch.Tensor:
    """The (S, 4) view of a plan's item rows: patch offset, t, h, w."""
    s = plan_max_items(plan)
    return plan[2 * s + 3 :].view(s, ITEM_FIELDS)


def build_plan(items: Items | torch.Tensor | Sequence[Sequence[int]], budget: int, max_items: int) -> torch.Tensor:
    """Lay out the plan of one call's items (images and video chunks; see the module docstring).

    items: the call's `Items`, taken as validated; raw grids (a CPU integer tensor or lists of (n, 2)
        image (h, w) or (n, 3) item (t, h, w) rows, in patches) are validated through `Items.of` first.
    budget: B, the patch rows of the graph; a multiple of 4 so that B / 4 merged rows exist.
    max_items: S, the graph's sequence slots.

    Returns a (6 * S + 3,) int32 CPU tensor, pinned when CUDA is available so `upload_plan` can copy it
    asynchronously. A fresh tensor each call: PyTorch's pinned-memory cache does not reuse a block
    until the copies that read it have run, so the caller may drop it right after `upload_plan`.
    """
    budget = check_budget(budget)
    max_items = check_int("max_items", max_items, 1)
    items = Items.of(items)
    if len(items) > max_items:
        raise ValueError(f"got {len(items)} items but max_items is {max_items}")
    total = items.patches
    if total > budget:
        raise ValueError(f"items hold {total} patches in total, more than the budget {budget}")
    # Filled through NumPy slices, so the host's Python work grows with the items, not with the slots
    # (the runner has 64 by default): converting a list of all 6 * S + 3 entries cost about 0.2 us an entry.
    n = len(items)
    plan = torch.empty(plan_numel(max_items), dtype=torch.int32, pin_memory=torch.cuda.is_available())
    flat = plan.numpy()
    flat[: n + 1] = items.offsets
    flat[n + 1 : max_items + 1] = total
    flat[max_items + 1] = budget
    cu_out = flat[max_items + 2 : 2 * max_items + 3]
    cu_out[0] = 0
    cu_out[1 : n + 1] = list(accumulate(items.tokens))
    cu_out[n + 1 :] = items.outputs
    rows = flat[2 * max_items + 3 :].reshape(max_items, ITEM_FIELDS)
    if n:
        rows[:n, 0] = items.offsets[:-1]
        rows[:n, 1:] = items.rows
    rows[n:] = (total, 0, 0, 0)
    return plan


def new_device_plan(max_items: int, device: torch.device | str) -> torch.Tensor:
    """A static device buffer for `upload_plan`."""
    return torch.zeros(plan_numel(check_int("max_items", max_items, 1)), dtype=torch.int32, device=device)


def upload_plan(plan: torch.Tensor, device_plan: torch.Tensor, budget: int | None = None) -> torch.Tensor:
    """Copy a host plan into a preallocated device buffer: one non-blocking H2D copy, no sync.

    budget: the B of the pixel buffer the plan will drive. Given, it is checked against the plan's own
    (its last cu_seqlens entry) on the host, where reading it is free: a plan for more rows than the
    buffer has would send attention and the merge past its end.
    """
    check_tensor("plan", plan, dtypes=(torch.int32,), shape=(None,))
    if plan.device.type != "cpu":
        raise ValueError(f"plan must be the CPU tensor from build_plan, got device {plan.device}")
    check_tensor("device_plan", device_plan, dtypes=(torch.int32,), shape=(plan.numel(),))
    if budget is not None:
        planned = int(plan[plan_max_items(plan) + 1])
        if planned != budget:
            raise ValueError(f"the plan was built for a budget of {planned} patches, but the buffer has {budget}")
    return device_plan.copy_(plan, non_blocking=True)


def extend_padding_sequence(device_plan: torch.Tensor, budget: int) -> torch.Tensor:
    """End an uploaded plan's padding sequence at `budget` rows, in place, with device work only.

    For a plan built before its graph's budget was known: `build_plan(items, total, S)` with the items'
    own patch total as the budget leaves no padding sequence. Recorded in a CUDA graph captured for B
    rows, this call sets the last cu_seqlens entry to B at every replay, so rows [total, B) become the
    padding sequence and the plan equals `build_plan(items, B, S)`. The items must fit (total <= B),
    which the caller checks on the host where the total is known: reading the plan here would sync.
    """
    check_tensor("device_plan", device_plan, dtypes=(torch.int32,), shape=(None,))
    budget = check_budget(budget)
    plan_cu_seqlens(device_plan)[-1:].fill_(budget)
    return device_plan


# Launch settings of `expand_plan` (see kernels/launch.py): `block_tokens` tokens per program; the
# interpreter pays per program, so it gets the largest blocks.
EXPAND_PLAN_LAUNCH = [
    {"device_class": "cpu", "block_tokens": 4096, "num_warps": 4},
    {"device_class": "sm90", "block_tokens": 256, "num_warps": 4},
]


def new_token_meta(budget: int, device: torch.device | str) -> torch.Tensor:
    """A static device buffer for `expand_plan`."""
    return torch.empty(META_ROWS, check_budget(budget), dtype=torch.int32, device=device)


@triton.jit
def _find_sequence(cu_ptr, key, num_slots, SEARCH_STEPS: tl.constexpr):
    # Largest i in [0, num_slots] with cu[i] <= key: branch-free binary search over the first S + 1
    # entries of cu_seqlens or cu_outputs (cu[0] = 0 <= key always). A zero-length slot i has cu[i] = cu[i + 1], so the
    # largest such i is never one: empty slots are skipped without a special case.
    pos = tl.zeros_like(key)
    for k in tl.static_range(SEARCH_STEPS):
        cand = pos + (1 << (SEARCH_STEPS - 1 - k))
        inside = cand <= num_slots
        v = tl.load(cu_ptr + cand, mask=inside, other=0)
        pos = tl.where(inside & (v <= key), cand, pos)
    return pos


@triton.jit
def _expand_plan_kernel(plan_ptr, meta_ptr, budget, num_slots, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    x = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = x < budget
    cu_out_ptr = plan_ptr + num_slots + 2
    items_ptr = plan_ptr + 2 * num_slots + 3

    seq = _find_sequence(plan_ptr, x, num_slots, SEARCH_STEPS)
    valid = live & (seq < num_slots)
    start = tl.load(plan_ptr + seq, mask=valid, other=0)
    h = tl.load(items_ptr + _ITEM_FIELDS * seq + 2, mask=valid, other=0)
    w = tl.load(items_ptr + _ITEM_FIELDS * seq + 3, mask=valid, other=0)
    frames = tl.load(items_ptr + _ITEM_FIELDS * seq + 1, mask=valid, other=0)
    local = x - start
    w_div = tl.maximum(w, 1)
    hw = tl.maximum(h * w, 1)
    in_frame = local % hw
    tl.store(meta_ptr + _ITEM * budget + x, tl.where(valid, seq, -1), mask=live)
    tl.store(meta_ptr + _ROW * budget + x, tl.where(valid, in_frame // w_div, 0), mask=live)
    tl.store(meta_ptr + _COL * budget + x, tl.where(valid, in_frame % w_div, 0), mask=live)
    tl.store(meta_ptr + _HEIGHT * budget + x, h, mask=live)
    tl.store(meta_ptr + _WIDTH * budget + x, w, mask=live)
    tl.store(meta_ptr + _TIME * budget + x, tl.where(valid & (frames > 1), local // hw + 1, 0), mask=live)

    # The same x read as a merged output token o, whose item is found in cu_outputs (S + 1 entries; a
    # match at S means o is past every item's outputs).
    o_live = live & (x < budget // 4)
    mseq = _find_sequence(cu_out_ptr, tl.where(o_live, x, 0), num_slots, SEARCH_STEPS)
    mvalid = o_live & (mseq < num_slots)
    mstart = tl.load(plan_ptr + mseq, mask=mvalid, other=0)
    mt = tl.load(items_ptr + _ITEM_FIELDS * mseq + 1, mask=mvalid, other=0)
    mh = tl.load(items_ptr + _ITEM_FIELDS * mseq + 2, mask=mvalid, other=0)
    mw = tl.load(items_ptr + _ITEM_FIELDS * mseq + 3, mask=mvalid, other=0)
    mout = tl.load(cu_out_ptr + mseq, mask=mvalid, other=0)
    half_w = tl.maximum(mw // 2, 1)
    lo = x - mout
    src = mstart + 2 * (lo // half_w) * mw + 2 * (lo % half_w)
    tl.store(meta_ptr + _MERGE_SRC * budget + x, tl.where(mvalid, src, -1), mask=live)
    tl.store(meta_ptr + _MERGE_WIDTH * budget + x, tl.where(mvalid, mw, 0), mask=live)
    tl.store(meta_ptr + _MERGE_FRAMES * budget + x, tl.where(mvalid, mt, 0), mask=live)
    tl.store(meta_ptr + _MERGE_STRIDE * budget + x, tl.where(mvalid, mh * mw, 0), mask=live)


def expand_plan(device_plan: torch.Tensor, token_meta: torch.Tensor) -> torch.Tensor:
    """Expand an uploaded plan into per-token metadata (layout in the module docstring).

    device_plan: the (6 * S + 3,) int32 buffer `upload_plan` filled, on the kernels' device.
    token_meta: the int32 (META_ROWS, B) output buffer (static inside a graph), from
        `new_token_meta(B, device)`; it is what tells the launcher B.

    B must equal the plan's last cu_seqlens entry (cu_seqlens[S + 1]); that is not checked here, as
    reading the plan would sync with the device (`upload_plan(..., budget=B)` checks it on the host, or
    `extend_padding_sequence(device_plan, B)` sets it on the device first).
    """
    check_tensor("device_plan", device_plan, dtypes=(torch.int32,), shape=(None,))
    num_slots = plan_max_items(device_plan)
    check_tensor("token_meta", token_meta, dtypes=(torch.int32,), shape=(META_ROWS, None), device=device_plan.device)
    budget = check_budget(token_meta.shape[1], "token_meta's column count B")
    launch = launch_settings(EXPAND_PLAN_LAUNCH, _expand_plan_kernel, device_plan.device, budget=budget)
    block = launch["block_tokens"]
    _expand_plan_kernel[(triton.cdiv(budget, block),)](
        device_plan, token_meta, budget, num_slots,
        SEARCH_STEPS=num_slots.bit_length(), BLOCK=block, num_warps=launch["num_warps"],
    )
    return token_meta


def expand_plan_reference(plan: torch.Tensor, budget: int) -> torch.Tensor:
    """Plain-PyTorch `expand_plan`: the same int32 (META_ROWS, B) table, without Triton."""
    cu = plan_cu_seqlens(plan).long()
    cu_out = plan_cu_outputs(plan).long()
    items = plan_items(plan).long()
    num_slots = items.shape[0]
    out = torch.empty(META_ROWS, budget, dtype=torch.int32, device=plan.device)

    x = torch.arange(budget, device=plan.device)
    seq = (torch.searchsorted(cu, x, right=True) - 1).clamp(max=num_slots)
    valid = seq < num_slots
    safe = seq.clamp(max=num_slots - 1)
    h = torch.where(valid, items[safe, 2], 0)
    w = torch.where(valid, items[safe, 3], 0)
    frames = torch.where(valid, items[safe, 1], 0)
    local = x - cu[seq]
    hw = (h * w).clamp(min=1)
    in_frame = local % hw
    out[META_ITEM] = torch.where(valid, seq, -1)
    out[META_ROW] = torch.where(valid, in_frame // w.clamp(min=1), 0)
    out[META_COL] = torch.where(valid, in_frame % w.clamp(min=1), 0)
    out[META_HEIGHT] = h
    out[META_WIDTH] = w
    out[META_TIME] = torch.where(valid & (frames > 1), local // hw + 1, 0)

    o = x[x < budget // MERGE_PATCHES]
    mseq = (torch.searchsorted(cu_out, o, right=True) - 1).clamp(max=num_slots)
    mvalid = mseq < num_slots
    msafe = mseq.clamp(max=num_slots - 1)
    mt, mh, mw = (torch.where(mvalid, items[msafe, i], 0) for i in (1, 2, 3))
    half_w = (mw // 2).clamp(min=1)
    lo = o - cu_out[msafe]
    src = items[msafe, 0] + 2 * (lo // half_w) * mw + 2 * (lo % half_w)
    out[META_MERGE_SRC] = -1
    out[META_MERGE_WIDTH:] = 0
    out[META_MERGE_SRC, : o.numel()] = torch.where(mvalid, src, -1)
    out[META_MERGE_WIDTH, : o.numel()] = mw
    out[META_MERGE_FRAMES, : o.numel()] = mt
    out[META_MERGE_STRIDE, : o.numel()] = mh * mw
    return out
