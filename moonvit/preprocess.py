"""Kimi-VL image preprocessing (docs/design.md section 1.2): PIL images or paths -> (pixel_values, grid_hws)."""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .inputs import MAX_GRID_SIDE

PATCH_SIZE = 14
MERGE_SIZE = 2
IN_TOKEN_LIMIT_INSTRUCT = 4096
IN_TOKEN_LIMIT_THINKING = 16384
MEAN = STD = 0.5


def _as_rgb(image: Image.Image | str | os.PathLike) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            opened.load()
            image = opened.copy()
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_to_limit(image: Image.Image, in_token_limit: int, patch_size: int = PATCH_SIZE) -> Image.Image:
    """Scales both sides by sqrt(limit / n) with Pillow's bicubic when n full patches exceed the limit."""
    w, h = image.size
    n = (w // patch_size) * (h // patch_size)
    if n <= in_token_limit:
        return image
    scale = math.sqrt(in_token_limit / n)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def preprocess_image(image, in_token_limit: int = IN_TOKEN_LIMIT_INSTRUCT, patch_size: int = PATCH_SIZE
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> ((h*w, 3, p, p) fp32 patches row-major, (h, w) in patches)."""
    if in_token_limit < 1:
        raise ValueError(f"in_token_limit must be >= 1, got {in_token_limit}")
    image = fit_to_limit(_as_rgb(image), in_token_limit, patch_size)
    w, h = image.size
    unit = patch_size * MERGE_SIZE
    padded_w, padded_h = -(-w // unit) * unit, -(-h // unit) * unit
    gh, gw = padded_h // patch_size, padded_w // patch_size
    if gh > MAX_GRID_SIDE or gw > MAX_GRID_SIDE:
        raise ValueError(f"image of {w}x{h} px needs a {gh}x{gw} patch grid after scaling, but a side may have "
                         f"at most {MAX_GRID_SIDE} patches (the aspect ratio is too extreme)")
    # Pad right and bottom with black before normalising, as the processor pads the PIL image.
    pixels = np.zeros((padded_h, padded_w, 3), dtype=np.float32)
    pixels[:h, :w] = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - MEAN) / STD
    patches = torch.from_numpy(pixels).view(gh, patch_size, gw, patch_size, 3).permute(0, 2, 4, 1, 3)
    return patches.reshape(gh * gw, 3, patch_size, patch_size).contiguous(), (gh, gw)


def preprocess_images(images: Iterable, in_token_limit: int = IN_TOKEN_LIMIT_INSTRUCT, patch_size: int = PATCH_SIZE
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (PIL or paths) -> (pixel_values (sum h*w, 3, p, p) fp32, grid_hws (n, 2) int64)."""
    outs = [preprocess_image(im, in_token_limit, patch_size) for im in images]
    if not outs:
        raise ValueError("no image given")
    return torch.cat([p for p, _ in outs]), torch.tensor([g for _, g in outs], dtype=torch.int64)


def tokens_per_image(grid_hws: torch.Tensor | Sequence[Sequence[int]]) -> list[int]:
    """Output tokens of each image: (h/2) * (w/2)."""
    return [(int(h) // MERGE_SIZE) * (int(w) // MERGE_SIZE) for h, w in torch.as_tensor(grid_hws).tolist()]
