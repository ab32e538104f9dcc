"""The model's side of vLLM's encoder CUDA-graph protocol for `FusedMoonVit`, without importing vLLM.

vLLM's `EncoderCudaGraphManager` asks the model for the buffers to capture at each token budget, for the
values to copy into them before each replay, and for the graph body; it copies the values in (through the
model's per-buffer padding logics) and replays. All of that lives here, so that a machine without vLLM can
drive it through real `torch.cuda.graph` captures (tests/test_gpu_protocol.py); `drop_in.py` only adapts
it to the protocol's classes and argument layout.

Items are images, (h, w) patches (Kimi-VL) or (1, h, w), and MoonViT3d's video chunks, (t, h, w) with t
frames (Kimi-K2.5 / K2.6). Every item yields h/2 * w/2 output tokens: a chunk's frames are averaged
before the merge.

Budgets: vLLM's count output tokens. A graph of token budget T works on B = 4 T k patch rows (the 2x2
merge), where k, the graph's frame factor, is 1 for images; a batch of items whose patches average
more than one frame per output position needs a graph of a larger k (`frame_factor`), which vLLM
captures as a separate axis (`EncoderCudaGraphConfig.capture_axes`). Attention's `max_seqlen` is baked
as B. The two buffers:

- `pixel_values`: (4 T, 3, p, p) for an images-only model (`frames=None`), or (4 T, k, 3, p, p) with a
  frame factor, whose rows, read flat, are the B patch rows; the layout lets the graph body return
  T output rows only, and vLLM 0.34 share it between the budgets of one k as a row prefix. In the
  model's dtype, or `uint8` where the model normalises raw pixels on the device (`normalize`).
- `moonvit_plan`: the int32 plan of `fused_moonvit.kernels.plan` for the graph's item slots.

Buffers shared between budgets (vLLM 0.34 hands smaller budgets row-prefix views of the largest budget's
buffers, and capture or replay at one budget leaves its data in the others') are safe here:

- The plan is written whole at every replay. It is built on the host without the graph's budget, which
  the protocol does not pass to replay preparation, and the graph body ends its padding sequence at its
  own B: the plan step and graph body of `MoonVitGraphRunner` (moonvit/runner.py, `items_plan` and
  `graph_body`), which this path shares.
- Pixel rows past the last item belong to the padding sequence, whatever they hold (another budget's
  pixels, NaN), as in the runner. So `copy_pixel_rows` writes the items' rows only and skips clearing
  the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import accumulate

import torch

from fused_moonvit.kernels.limits import MERGE_PATCHES
from fused_moonvit.kernels.items import Items, grid_thw_list
from fused_moonvit.kernels.plan import build_plan, new_device_plan, plan_max_items, upload_plan
from fused_moonvit.moonvit.fused import FusedMoonVit
from fused_moonvit.moonvit.runner import graph_body, items_plan

PIXELS_KEY = "pixel_values"
PLAN_KEY = "moonvit_plan"
BUFFER_KEYS = (PIXELS_KEY, PLAN_KEY)

# Maps the pixel buffer (rows, 3, p, p), in its own dtype, to the model's pixels.
Normalize = Callable[[torch.Tensor], torch.Tensor]


def _check_frames(frames: int | None) -> None:
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames (the graph's frame factor) must be a positive int or None, got {frames!r}")


def patch_budget(token_budget: int, frames: int | None = None) -> int:
    """Patch rows of the graph for vLLM's `token_budget` output tokens and frame factor `frames`."""
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
    _check_frames(frames)
    return MERGE_PATCHES * token_budget * (frames or 1)


def frame_factors(max_frames: int) -> tuple[int, ...]:
    """The frame factors to capture for items of up to `max_frames` frames: 1, the powers of two below
    `max_frames`, and `max_frames` (1, 2, 4 for Kimi-K2.5's 4-frame chunks), so that a batch runs on at
    most about twice the patch rows it needs and the graph count grows with log2(max_frames)."""
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
    return tuple(sorted({2**i for i in range(max_frames.bit_length()) if 2**i < max_frames} | {max_frames}))


def frame_factor(grid: Sequence[Sequence[int]], factors: Sequence[int]) -> int:
    """The smallest of `factors` whose graphs hold these items at any token budget that holds their
    outputs: k with 4 T k >= sum(t h w) whenever T >= sum(h w / 4), i.e. k >= sum(t h w) / sum(h w)."""
    items = grid_thw_list(grid)
    positions = sum(h * w for _, h, w in items)
    patches = sum(t * h * w for t, h, w in items)
    need = -(-patches // positions) if positions else 1
    for k in sorted(factors):
        if k >= need:
            return k
    raise ValueError(f"items averaging {patches / positions:.2f} frames per position need a frame factor of "
                     f"{need}, above the largest captured one, {max(factors)}")


def buffer_rows(pixel_buffer: torch.Tensor) -> int:
    """Patch rows B of a pixel buffer of either layout."""
    return math.prod(pixel_buffer.shape[:-3])


def _flat_pixels(pixel_buffer: torch.Tensor) -> torch.Tensor:
    return pixel_buffer.view(-1, *pixel_buffer.shape[-3:])


def capture_buffers(encoder: FusedMoonVit, token_budget: int, slots: int, device: torch.device,
                    dtype: torch.dtype, frames: int | None = None) -> dict[str, torch.Tensor]:
    """The buffers a graph of `token_budget` output tokens, `slots` items and frame factor `frames`
    (None: the images-only layout) records: zero pixels of `dtype` (the model's, or uint8 for raw
    pixels) and an all-padding plan, so that nothing the graph records depends on an item."""
    patches = patch_budget(token_budget, frames)
    p = encoder.config.patch_size
    encoder.rope_table(device)  # built now: its first build copies from the host, which a capture forbids
    encoder.vision_tower.patch_embed.time_table(device)  # likewise, for MoonViT3d's time embedding
    plan = upload_plan(build_plan([], patches, slots), new_device_plan(slots, device), budget=patches)
    rows = (MERGE_PATCHES * token_budget,) if frames is None else (MERGE_PATCHES * token_budget, frames)
    return {PIXELS_KEY: torch.zeros(*rows, 3, p, p, device=device, dtype=dtype), PLAN_KEY: plan}


def _check_pixels(pixel_values: torch.Tensor, patch_size: int) -> None:
    if not isinstance(pixel_values, torch.Tensor) or not (pixel_values.dtype.is_floating_point
                                                          or pixel_values.dtype == torch.uint8):
        raise TypeError(f"pixel_values must be a floating-point (or raw uint8) tensor, got "
                        f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}")
    want = (3, patch_size, patch_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
        raise ValueError(f"pixel_values must have shape (N, 3, {patch_size}, {patch_size}), "
                         f"got {tuple(pixel_values.shape)}")


def replay_values(encoder: FusedMoonVit, pixel_values: torch.Tensor, items: Items | Sequence[Sequence[int]],
                  slots: int) -> dict[str, torch.Tensor]:
    """What to copy into a graph's buffers to encode these items (an `Items`, or vLLM's host grid of
    (h, w) or (t, h, w) rows).

    The grid is validated here, once, into an `Items` (frame counts against the encoder's) that
    `build_plan` trusts. The plan is uploaded here, asynchronously from pinned memory, so that the copy
    into the captured buffer is device to device and no replay waits on the host.
    """
    _check_pixels(pixel_values, encoder.config.patch_size)
    items = Items.of(items, max_frames=encoder.config.max_frames)
    rows = pixel_values.shape[0]
    items.check_rows(rows)
    plan = items_plan(items, rows, slots)
    return {PIXELS_KEY: pixel_values, PLAN_KEY: plan.to(pixel_values.device, non_blocking=True)}


def copy_pixel_rows(buffer: torch.Tensor, pixel_values: torch.Tensor) -> None:
    """Padding logic for the pixel buffer: the items' rows only; rows past them are padding and may keep
    whatever they hold (see the module docstring). Floating-point pixels are refused by a uint8 buffer,
    which would truncate them."""
    flat = _flat_pixels(buffer)
    rows = pixel_values.shape[0]
    if rows > flat.shape[0] or pixel_values.shape[1:] != flat.shape[1:]:
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not fit the graph's pixel buffer "
                         f"{tuple(buffer.shape)} ({flat.shape[0]} patch rows)")
    if buffer.dtype == torch.uint8 and pixel_values.dtype != torch.uint8:
        raise TypeError(f"the graph takes raw uint8 pixels (the model normalises them on the device), "
                        f"got {pixel_values.dtype}")
    flat[:rows].copy_(pixel_values)


def copy_plan(buffer: torch.Tensor, plan: torch.Tensor) -> None:
    """Padding logic for the plan buffer: the whole plan, whose layout depends on its slot count, so the
    replay's must be the graph's."""
    if plan.shape != buffer.shape:
        raise ValueError(f"the replay plan has {plan_max_items(plan)} item slots but the graph was captured "
                         f"with {plan_max_items(buffer)}")
    buffer.copy_(plan)


PADDING_LOGICS = {PIXELS_KEY: copy_pixel_rows, PLAN_KEY: copy_plan}


def graph_forward(encoder: FusedMoonVit, buffers: dict[str, torch.Tensor],
                  normalize: Normalize | None = None) -> torch.Tensor:
    """The graph body: (T, output_size) for the buffers of a graph of T output tokens (4 T k patch rows).

    normalize: applied to the pixel buffer first (vLLM's on-device normalisation of raw pixels); None
    passes it through, which needs it in the model's dtype."""
    pixel_buffer, plan = buffers[PIXELS_KEY], buffers[PLAN_KEY]
    pixels = _flat_pixels(pixel_buffer)
    if normalize is not None:
        pixels = normalize(pixels)
    return graph_body(encoder, pixels, plan)[: pixel_buffer.shape[0] // MERGE_PATCHES]


def select_items(pixel_values: torch.Tensor, grid: Sequence[Sequence[int]],
                 indices: Sequence[int]) -> tuple[torch.Tensor, list[list[int]]]:
    """The pixels and grid of items `indices`, in that order. Not validated: vLLM's own grid, which
    `replay_values` or the eager forward validate when these items run."""
    offsets = [0, *accumulate(t * h * w for t, h, w in grid_thw_list(grid))]
    parts = [pixel_values[offsets[i]:offsets[i + 1]] for i in indices]
    return (torch.cat(parts) if parts else pixel_values[:0]), [list(grid[i]) for i in indices]
