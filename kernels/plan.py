"""The per-call plan: which rows of a budget of B patch tokens belong to which image.

Host side, once per call and O(images): `build_plan` turns the images' patch grids into one small int32
table whose size depends only on the number of sequence slots S, so a CUDA graph captured for (B, S)
can replay any batch that fits. `upload_plan` copies it into a preallocated device buffer with one
non-blocking H2D copy.

Device side, inside the graph: `expand_plan` (one small Triton kernel, no host sync, no data-dependent
shape) expands the table into per-token metadata that the position-embedding, RoPE and merge kernels
read directly, so none of them searches `cu_seqlens` itself.

Plan layout (flat int32, `plan_numel(S) = 5 * S + 2` entries):

    [0, S + 2)          cu_seqlens: 0, then the running patch count after each slot, then B.
                        Unused slots repeat the total (zero-length sequences); the last sequence,
                        [total, B), is the padding sequence. Every row 0..B-1 belongs to exactly one
                        sequence, so varlen attention over S + 1 sequences never reads undefined rows.
    [S + 2, 5 * S + 2)  images, (S, 4) row-major: patch offset, h, w, output offset.
                        Unused slots hold (total, 0, 0, total / 4). The output offset (first merged
                        token of the image) is always patch offset / 4, since h and w are even.

Token metadata layout (`token_meta`, int32 (META_ROWS, B), one row per field):

    META_IMAGE        image slot of token t, or -1 for a padding token
    META_ROW          patch row of token t inside its image (0 for padding)
    META_COL          patch column of token t inside its image (0 for padding)
    META_HEIGHT       h of the token's image (0 for padding)
    META_WIDTH        w of the token's image (0 for padding)
    META_MERGE_SRC    for o < B / 4: row of the (0, 0) sub-token of merged output token o, or -1 if o is
                      padding; -1 for o >= B / 4
    META_MERGE_WIDTH  for o < B / 4: w of the image of merged token o (the row stride between its
                      (0, x) and (1, x) sub-tokens), or 0; 0 for o >= B / 4
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._checks import check_launchable, check_tensor
from .limits import MAX_GRID_SIDE, check_budget, check_int

IMAGE_FIELDS = 4

META_IMAGE = 0
META_ROW = 1
META_COL = 2
META_HEIGHT = 3
META_WIDTH = 4
META_MERGE_SRC = 5
META_MERGE_WIDTH = 6
META_ROWS = 7

# Triton kernels may read module globals only when they are constexpr objects.
_IMAGE_FIELDS = tl.constexpr(IMAGE_FIELDS)
_IMAGE = tl.constexpr(META_IMAGE)
_ROW = tl.constexpr(META_ROW)
_COL = tl.constexpr(META_COL)
_HEIGHT = tl.constexpr(META_HEIGHT)
_WIDTH = tl.constexpr(META_WIDTH)
_MERGE_SRC = tl.constexpr(META_MERGE_SRC)
_MERGE_WIDTH = tl.constexpr(META_MERGE_WIDTH)


def plan_numel(max_images: int) -> int:
    """Number of int32 entries in the plan for `max_images` sequence slots."""
    return (max_images + 2) + IMAGE_FIELDS * max_images


def plan_max_images(plan: torch.Tensor) -> int:
    """The slot count S a plan (host or device) was built for, from its size alone."""
    n = plan.numel()
    if n < plan_numel(1) or (n - 2) % (IMAGE_FIELDS + 1):
        raise ValueError(f"plan must have 5 * S + 2 entries for some S >= 1, got {n}")
    return (n - 2) // (IMAGE_FIELDS + 1)


def plan_cu_seqlens(plan: torch.Tensor) -> torch.Tensor:
    """The (S + 2,) int32 cu_seqlens view of a plan: S image slots, then the padding sequence."""
    return plan[: plan_max_images(plan) + 2]


def plan_images(plan: torch.Tensor) -> torch.Tensor:
    """The (S, 4) view of a plan's image rows: patch offset, h, w, output offset."""
    s = plan_max_images(plan)
    return plan[s + 2 :].view(s, IMAGE_FIELDS)


def _grid_list(grid_hws: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if not isinstance(grid_hws, torch.Tensor):
        grid_hws = torch.as_tensor(grid_hws) if len(grid_hws) else torch.zeros(0, 2, dtype=torch.int64)
    if grid_hws.is_floating_point() or grid_hws.is_complex() or grid_hws.dtype == torch.bool:
        raise TypeError(f"grid_hws must have an integer dtype, got {grid_hws.dtype}")
    if grid_hws.device.type != "cpu":
        # Reading it would sync with the device; the caller has the grids on the host anyway.
        raise ValueError(f"grid_hws must be a CPU tensor, got device {grid_hws.device}")
    if grid_hws.dim() != 2 or grid_hws.shape[1] != 2:
        raise ValueError(f"grid_hws must have shape (n, 2), got {tuple(grid_hws.shape)}")
    return grid_hws.tolist()


def build_plan(
    grid_hws: torch.Tensor | Sequence[Sequence[int]], budget: int, max_images: int
) -> torch.Tensor:
    """Validate the images of one call and lay out their plan (see the module docstring).

    grid_hws: CPU integer tensor (n, 2) of (h, w) in patches (a list of pairs also works).
    budget: B, the patch rows of the graph; a multiple of 4 so that B / 4 merged rows exist.
    max_images: S, the graph's sequence slots.

    Returns a (5 * S + 2,) int32 CPU tensor, pinned when CUDA is available so `upload_plan` can copy it
    asynchronously. A fresh tensor each call: PyTorch's pinned-memory cache does not reuse a block
    until the copies that read it have run, so the caller may drop it right after `upload_plan`.
    """
    budget = check_budget(budget)
    max_images = check_int("max_images", max_images, 1)
    grids = _grid_list(grid_hws)
    if len(grids) > max_images:
        raise ValueError(f"got {len(grids)} images but max_images is {max_images}")

    cu = [0]
    images = []
    for i, (h, w) in enumerate(grids):
        for side, v in (("h", h), ("w", w)):
            if not 1 <= v <= MAX_GRID_SIDE:
                raise ValueError(f"image {i}: {side} must be in 1..{MAX_GRID_SIDE} patches, got {v}")
            if v % 2:
                raise ValueError(f"image {i}: {side} must be even for the 2x2 merge, got {v}")
        images += [cu[-1], h, w, cu[-1] // 4]
        cu.append(cu[-1] + h * w)
    total = cu[-1]
    if total > budget:
        raise ValueError(f"images hold {total} patches in total, more than the budget {budget}")
    unused = max_images - len(grids)
    cu += [total] * unused + [budget]
    images += [total, 0, 0, total // 4] * unused
    return torch.tensor(cu + images, dtype=torch.int32, pin_memory=torch.cuda.is_available())


def new_device_plan(max_images: int, device: torch.device | str) -> torch.Tensor:
    """A static device buffer for `upload_plan`."""
    return torch.zeros(plan_numel(check_int("max_images", max_images, 1)), dtype=torch.int32, device=device)


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
        planned = int(plan[plan_max_images(plan) + 1])
        if planned != budget:
            raise ValueError(f"the plan was built for a budget of {planned} patches, but the buffer has {budget}")
    return device_plan.copy_(plan, non_blocking=True)


def extend_padding_sequence(device_plan: torch.Tensor, budget: int) -> torch.Tensor:
    """End an uploaded plan's padding sequence at `budget` rows, in place, with device work only.

    For a plan built before its graph's budget was known: `build_plan(grid, total, S)` with the images'
    own patch total as the budget leaves no padding sequence. Recorded in a CUDA graph captured for B
    rows, this call sets the last cu_seqlens entry to B at every replay, so rows [total, B) become the
    padding sequence and the plan equals `build_plan(grid, B, S)`. The images must fit (total <= B),
    which the caller checks on the host where the total is known: reading the plan here would sync.
    """
    check_tensor("device_plan", device_plan, dtypes=(torch.int32,), shape=(None,))
    budget = check_budget(budget)
    plan_cu_seqlens(device_plan)[-1:].fill_(budget)
    return device_plan


def new_token_meta(budget: int, device: torch.device | str) -> torch.Tensor:
    """A static device buffer for `expand_plan`."""
    return torch.empty(META_ROWS, check_budget(budget), dtype=torch.int32, device=device)


@triton.jit
def _find_sequence(cu_ptr, key, num_slots, SEARCH_STEPS: tl.constexpr):
    # Largest i in [0, num_slots] with cu[i] <= key: branch-free binary search over the S + 2
    # cu_seqlens entries (cu[0] = 0 <= key always). A zero-length slot i has cu[i] = cu[i + 1], so the
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
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = t < budget
    images_ptr = plan_ptr + num_slots + 2

    seq = _find_sequence(plan_ptr, t, num_slots, SEARCH_STEPS)
    valid = live & (seq < num_slots)
    start = tl.load(plan_ptr + seq, mask=valid, other=0)
    h = tl.load(images_ptr + _IMAGE_FIELDS * seq + 1, mask=valid, other=0)
    w = tl.load(images_ptr + _IMAGE_FIELDS * seq + 2, mask=valid, other=0)
    local = t - start
    w_div = tl.maximum(w, 1)
    tl.store(meta_ptr + _IMAGE * budget + t, tl.where(valid, seq, -1), mask=live)
    tl.store(meta_ptr + _ROW * budget + t, tl.where(valid, local // w_div, 0), mask=live)
    tl.store(meta_ptr + _COL * budget + t, tl.where(valid, local % w_div, 0), mask=live)
    tl.store(meta_ptr + _HEIGHT * budget + t, h, mask=live)
    tl.store(meta_ptr + _WIDTH * budget + t, w, mask=live)

    # The same t read as a merged output token o. Output offsets are patch offsets / 4, so the image
    # of o is the sequence holding patch row 4 * o.
    o_live = live & (t < budget // 4)
    mseq = _find_sequence(plan_ptr, tl.where(o_live, 4 * t, 0), num_slots, SEARCH_STEPS)
    mvalid = o_live & (mseq < num_slots)
    mstart = tl.load(plan_ptr + mseq, mask=mvalid, other=0)
    mw = tl.load(images_ptr + _IMAGE_FIELDS * mseq + 2, mask=mvalid, other=0)
    mout = tl.load(images_ptr + _IMAGE_FIELDS * mseq + 3, mask=mvalid, other=0)
    half_w = tl.maximum(mw // 2, 1)
    lo = t - mout
    src = mstart + 2 * (lo // half_w) * mw + 2 * (lo % half_w)
    tl.store(meta_ptr + _MERGE_SRC * budget + t, tl.where(mvalid, src, -1), mask=live)
    tl.store(meta_ptr + _MERGE_WIDTH * budget + t, tl.where(mvalid, mw, 0), mask=live)


def expand_plan(device_plan: torch.Tensor, token_meta: torch.Tensor) -> torch.Tensor:
    """Expand an uploaded plan into per-token metadata (layout in the module docstring).

    device_plan: the (5 * S + 2,) int32 buffer `upload_plan` filled, on the kernels' device.
    token_meta: the int32 (META_ROWS, B) output buffer (static inside a graph), from
        `new_token_meta(B, device)`; it is what tells the launcher B.

    B must equal the budget the plan was built for (cu_seqlens[S + 1]); that is not checked here, as
    reading the plan would sync with the device (`upload_plan(..., budget=B)` checks it on the host).
    """
    check_tensor("device_plan", device_plan, dtypes=(torch.int32,), shape=(None,))
    num_slots = plan_max_images(device_plan)
    check_tensor("token_meta", token_meta, dtypes=(torch.int32,), shape=(META_ROWS, None), device=device_plan.device)
    budget = check_budget(token_meta.shape[1], "token_meta's column count B")
    interpreted = check_launchable(_expand_plan_kernel, device_plan.device)
    block = 4096 if interpreted else 256
    _expand_plan_kernel[(triton.cdiv(budget, block),)](
        device_plan, token_meta, budget, num_slots,
        SEARCH_STEPS=num_slots.bit_length(), BLOCK=block, num_warps=4,
    )
    return token_meta


def expand_plan_reference(plan: torch.Tensor, budget: int) -> torch.Tensor:
    """Plain-PyTorch `expand_plan`: the same int32 (META_ROWS, B) table, without Triton."""
    cu = plan_cu_seqlens(plan).long()
    images = plan_images(plan).long()
    num_slots = images.shape[0]
    out = torch.empty(META_ROWS, budget, dtype=torch.int32, device=plan.device)

    t = torch.arange(budget, device=plan.device)
    seq = (torch.searchsorted(cu, t, right=True) - 1).clamp(max=num_slots)
    valid = seq < num_slots
    safe = seq.clamp(max=num_slots - 1)
    h = torch.where(valid, images[safe, 1], 0)
    w = torch.where(valid, images[safe, 2], 0)
    local = t - cu[seq]
    out[META_IMAGE] = torch.where(valid, seq, -1)
    out[META_ROW] = torch.where(valid, local // w.clamp(min=1), 0)
    out[META_COL] = torch.where(valid, local % w.clamp(min=1), 0)
    out[META_HEIGHT] = h
    out[META_WIDTH] = w

    o = t[t < budget // 4]
    mseq = (torch.searchsorted(cu, 4 * o, right=True) - 1).clamp(max=num_slots)
    mvalid = mseq < num_slots
    msafe = mseq.clamp(max=num_slots - 1)
    mw = torch.where(mvalid, images[msafe, 2], 0)
    half_w = (mw // 2).clamp(min=1)
    lo = o - images[msafe, 3]
    src = images[msafe, 0] + 2 * (lo // half_w) * mw + 2 * (lo % half_w)
    out[META_MERGE_SRC] = -1
    out[META_MERGE_WIDTH] = 0
    out[META_MERGE_SRC, : o.numel()] = torch.where(mvalid, src, -1)
    out[META_MERGE_WIDTH, : o.numel()] = mw
    return out
