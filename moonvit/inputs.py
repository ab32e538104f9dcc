"""Checks on the encoder's inputs, shared by every model class: bad input fails before any work."""

from __future__ import annotations

import math

import torch

from fused_moonvit.kernels.limits import MAX_GRID_SIDE


def check_grid_hws(grid_hws: torch.Tensor | list | tuple, max_side: int = MAX_GRID_SIDE,
                   max_frames: int = 1) -> torch.Tensor:
    """Returns the items' grid as a CPU int64 (n, 3) tensor of (t, h, w), or raises naming the bad value.

    grid_hws: (n, 2) of image (h, w), or (n, 3) of (t, h, w) with t <= max_frames (video chunks of a
    MoonViT3d tower; Kimi-VL's MoonVit takes t = 1 only)."""
    if not isinstance(grid_hws, torch.Tensor):
        grid_hws = torch.as_tensor(grid_hws)
    if grid_hws.dtype.is_floating_point or grid_hws.dtype.is_complex or grid_hws.dtype == torch.bool:
        raise TypeError(f"grid_hws must hold integers, got dtype {grid_hws.dtype}")
    if grid_hws.dim() != 2 or grid_hws.shape[1] not in (2, 3):
        raise ValueError(f"grid_hws must have shape (n_images, 2) of (h, w) or (n_items, 3) of (t, h, w), "
                         f"got {tuple(grid_hws.shape)}")
    if grid_hws.shape[0] == 0:
        raise ValueError("grid_hws holds no image")
    grid = grid_hws.detach().to("cpu", torch.int64)
    if grid.shape[1] == 2:
        grid = torch.cat([torch.ones_like(grid[:, :1]), grid], dim=1)
    for i, (t, h, w) in enumerate(grid.tolist()):
        if not 1 <= t <= max_frames:
            raise ValueError(f"item {i}: t={t} frames is outside 1..{max_frames} (grid {t}x{h}x{w}); "
                             + ("this tower takes images only" if max_frames == 1 else
                                f"the tower's time embedding has {max_frames} frames"))
        what = "image" if t == 1 else "item"
        for name, side in (("h", h), ("w", w)):
            if not 1 <= side <= max_side:
                raise ValueError(f"{what} {i}: grid {name}={side} is outside 1..{max_side} patches (grid {h}x{w})")
            if side % 2:
                raise ValueError(f"{what} {i}: grid {name}={side} is not a multiple of the merge size 2 (grid {h}x{w})")
    return grid


def patch_offsets(grid) -> list[int]:
    """Each item's first patch row in the packed input, then the total: [0, h0*w0, h0*w0 + h1*w1, ...]
    for (h, w) rows, or with t*h*w for (t, h, w) rows."""
    offsets = [0]
    for row in grid:
        offsets.append(offsets[-1] + math.prod(int(v) for v in row))
    return offsets


def check_inputs(pixel_values: torch.Tensor, grid_hws, patch_size: int, max_frames: int = 1) -> torch.Tensor:
    """Validates `(pixel_values, grid_hws)` together; returns the grid as a CPU int64 (n, 3) tensor of
    (t, h, w)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(f"pixel_values must be floating point, got dtype {pixel_values.dtype}")
    want = (3, patch_size, patch_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
        raise ValueError(f"pixel_values must have shape (N, {', '.join(map(str, want))}), "
                         f"got {tuple(pixel_values.shape)}")
    grid = check_grid_hws(grid_hws, max_frames=max_frames)
    total = int(grid.prod(dim=1).sum())
    if pixel_values.shape[0] != total:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_hws "
                         f"{grid.tolist()} needs {total}")
    return grid
