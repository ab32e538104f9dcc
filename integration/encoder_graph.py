"""The model's side of vLLM's encoder CUDA-graph protocol for `FusedMoonVit`, without importing vLLM.

vLLM's `EncoderCudaGraphManager` asks the model for the buffers to capture at each token budget, for the
values to copy into them before each replay, and for the graph body; it copies the values in (through the
model's per-buffer padding logics) and replays. All of that lives here, so that a machine without vLLM can
drive it through real `torch.cuda.graph` captures (tests/test_gpu_protocol.py); `kimi_vl.py` only adapts it
to the protocol's classes and argument layout.

Budgets: vLLM's count output tokens. A graph of token budget T works on B = 4 T patch rows (the 2x2 merge),
and attention's `max_seqlen` is baked as B. Its two buffers:

- `pixel_values`: (B, 3, p, p) in the model's dtype.
- `moonvit_plan`: the int32 plan of `fused_moonvit.kernels.plan` for the graph's image slots.

Buffers shared between budgets (vLLM 0.34 hands smaller budgets row-prefix views of the largest budget's
buffers, and capture or replay at one budget leaves its data in the others') are safe here:

- The plan is written whole at every replay. It is built on the host without the graph's budget, which
  the protocol does not pass to replay preparation, so it ends at the images' patch total; the graph body
  then ends its padding sequence at its own B (`extend_padding_sequence`, recorded in the graph).
- Pixel rows past the last image belong to the padding sequence, whatever they hold (another budget's
  pixels, NaN): the position-embedding kernel zeroes them, attention keeps sequences apart, and their
  outputs are discarded. So `copy_pixel_rows` writes the images' rows only and skips clearing the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fused_moonvit.kernels.plan import (build_plan, extend_padding_sequence, new_device_plan,
                                        plan_max_images, upload_plan)
from fused_moonvit.moonvit.fused import FusedMoonVit
from fused_moonvit.moonvit.inputs import patch_offsets

PIXELS_KEY = "pixel_values"
PLAN_KEY = "moonvit_plan"
BUFFER_KEYS = (PIXELS_KEY, PLAN_KEY)
PATCHES_PER_TOKEN = 4  # the 2x2 merge


def patch_budget(token_budget: int) -> int:
    """Patch rows of the graph for vLLM's `token_budget` output tokens."""
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
    return PATCHES_PER_TOKEN * token_budget


def capture_buffers(encoder: FusedMoonVit, token_budget: int, slots: int, device: torch.device,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The buffers a graph of `token_budget` output tokens and `slots` images records: zero pixels and an
    all-padding plan, so that nothing the graph records depends on an image."""
    patches = patch_budget(token_budget)
    p = encoder.config.patch_size
    encoder.rope_table(device)  # built now: its first build copies from the host, which a capture forbids
    plan = upload_plan(build_plan([], patches, slots), new_device_plan(slots, device), budget=patches)
    return {PIXELS_KEY: torch.zeros(patches, 3, p, p, device=device, dtype=dtype), PLAN_KEY: plan}


def _check_pixels(pixel_values: torch.Tensor, patch_size: int) -> None:
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
        raise TypeError(f"pixel_values must be a floating-point tensor, got "
                        f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}")
    want = (3, patch_size, patch_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
        raise ValueError(f"pixel_values must have shape (N, 3, {patch_size}, {patch_size}), "
                         f"got {tuple(pixel_values.shape)}")


def replay_values(encoder: FusedMoonVit, pixel_values: torch.Tensor, grid: Sequence[Sequence[int]],
                  slots: int) -> dict[str, torch.Tensor]:
    """What to copy into a graph's buffers to encode these images (`grid`: host (h, w) pairs).

    The grid is validated once, by `build_plan`. The plan is uploaded here, asynchronously from pinned
    memory, so that the copy into the captured buffer is device to device and no replay waits on the host.
    """
    _check_pixels(pixel_values, encoder.config.patch_size)
    rows = pixel_values.shape[0]
    # Its budget is the pixel rows (rounded up to the merge): build_plan checks every image and that they
    # need no more rows than that; fewer is caught below.
    plan = build_plan(grid, max(-(-rows // PATCHES_PER_TOKEN), 1) * PATCHES_PER_TOKEN, slots)
    total = patch_offsets(grid)[-1]
    if total != rows:
        raise ValueError(f"pixel_values has {rows} patches but the grid {[list(g) for g in grid]} needs {total}")
    return {PIXELS_KEY: pixel_values, PLAN_KEY: plan.to(pixel_values.device, non_blocking=True)}


def copy_pixel_rows(buffer: torch.Tensor, pixel_values: torch.Tensor) -> None:
    """Padding logic for the pixel buffer: the images' rows only; rows past them are padding and may keep
    whatever they hold (see the module docstring)."""
    rows = pixel_values.shape[0]
    if rows > buffer.shape[0] or pixel_values.shape[1:] != buffer.shape[1:]:
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not fit the graph's pixel buffer "
                         f"{tuple(buffer.shape)}")
    buffer[:rows].copy_(pixel_values)


def copy_plan(buffer: torch.Tensor, plan: torch.Tensor) -> None:
    """Padding logic for the plan buffer: the whole plan, whose layout depends on its slot count, so the
    replay's must be the graph's."""
    if plan.shape != buffer.shape:
        raise ValueError(f"the replay plan has {plan_max_images(plan)} image slots but the graph was captured "
                         f"with {plan_max_images(buffer)}")
    buffer.copy_(plan)


PADDING_LOGICS = {PIXELS_KEY: copy_pixel_rows, PLAN_KEY: copy_plan}


def graph_forward(encoder: FusedMoonVit, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The graph body: (B / 4, output_size) for the buffers of a graph of B patch rows."""
    pixel_values, plan = buffers[PIXELS_KEY], buffers[PLAN_KEY]
    extend_padding_sequence(plan, pixel_values.shape[0])
    return encoder.forward_static(pixel_values, plan)


def select_items(pixel_values: torch.Tensor, grid: Sequence[Sequence[int]],
                 indices: Sequence[int]) -> tuple[torch.Tensor, list[list[int]]]:
    """The pixels and grid of images `indices`, in that order."""
    offsets = patch_offsets(grid)
    parts = [pixel_values[offsets[i]:offsets[i + 1]] for i in indices]
    return (torch.cat(parts) if parts else pixel_values[:0]), [list(grid[i]) for i in indices]
