"""Checks on the encoder's inputs, shared by every model class: bad input fails before any work.

The grid's checks live in `Items.of` (kernels/items.py), below the kernels' plan, so that the plan can take
an `Items` without checking it again; this module adds the pixels."""

from __future__ import annotations

import torch

from fused_moonvit.kernels.items import Items


def check_inputs(pixel_values: torch.Tensor, items, patch_size: int, max_frames: int = 1) -> Items:
    """Validates `(pixel_values, items)` together; returns the call's `Items`.

    items: an `Items`, or the grid of (n, 2) image (h, w) rows or (n, 3) (t, h, w) rows with
    t <= max_frames (video chunks of a MoonViT3d tower; Kimi-VL's MoonVit takes t = 1 only)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(f"pixel_values must be floating point, got dtype {pixel_values.dtype}")
    want = (3, patch_size, patch_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
        raise ValueError(f"pixel_values must have shape (N, {', '.join(map(str, want))}), "
                         f"got {tuple(pixel_values.shape)}")
    if isinstance(items, torch.Tensor):
        # The eager forward reads the grid on the host anyway; `Items.of` refuses device tensors because
        # the layers that take them must not sync.
        items = items.detach().cpu()
    items = Items.of(items, max_frames=max_frames)
    if not len(items):
        raise ValueError("the grid holds no item")
    items.check_rows(pixel_values.shape[0])
    return items
