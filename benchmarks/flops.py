"""Useful FLOPs of one MoonVit encoder call: the matrix products only, padding not counted.

Grids are (h, w) images or (t, h, w) items (MoonViT3d's video chunks, whose t * h * w patches attend to
each other and merge to h/2 * w/2 tokens).

Effective TFLOP/s in the benchmarks divide these by the whole call's time, so every path is charged the
same work however much padding or host work it does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from fused_moonvit.moonvit.config import MoonVitConfig


def attention_flops(grids: Iterable[Sequence[int]], width: int) -> int:
    """FLOPs of one layer's attention over items of `grids` patches, `width` = heads x head dim:
    q @ k^T and p @ v, 2 * n * width each, per token of an n-patch item."""
    return sum(4 * width * math.prod(g) ** 2 for g in grids)


def encoder_flops_breakdown(grids: Iterable[Sequence[int]], config: MoonVitConfig) -> dict[str, int]:
    """FLOPs per part for items of `grids` patches; a multiply-add counts as 2."""
    c, a, inter, layers = (config.hidden_size, config.attention_width, config.intermediate_size,
                           config.num_hidden_layers)
    patch_values = 3 * config.patch_size ** 2
    merged = config.merged_hidden_size
    grids = list(grids)
    tokens = sum(math.prod(g) for g in grids)
    outputs = sum(g[-2] * g[-1] // 4 for g in grids)
    flops = {
        "patch_embed": 2 * patch_values * c * tokens,
        # wqkv (c -> 3a), wo (a -> c), fc0 (c -> inter), fc1 (inter -> c); a = c but for Kimi-K3.
        "layer_gemms": 2 * layers * (4 * a * c + 2 * c * inter) * tokens,
        "attention": layers * attention_flops(grids, a),
        "projector": 0,
    }
    if config.text_hidden_size is not None:
        flops["projector"] = 2 * merged * (merged + config.text_hidden_size) * outputs
    return flops


def encoder_flops(grids: Iterable[Sequence[int]], config: MoonVitConfig) -> int:
    """Total useful FLOPs of one encoder call over items of `grids` patches."""
    return sum(encoder_flops_breakdown(grids, config).values())
