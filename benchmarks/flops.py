"""Useful FLOPs of one MoonVit encoder call: the matrix products only, padding not counted.

Effective TFLOP/s in the benchmarks divide these by the whole call's time, so every path is charged the
same work however much padding or host work it does.
"""

from __future__ import annotations

from collections.abc import Iterable

from fused_moonvit.moonvit.config import MoonVitConfig


def attention_flops(grids: Iterable[tuple[int, int]], width: int) -> int:
    """FLOPs of one layer's attention over images of `grids` (h, w) patches, `width` = heads x head dim:
    q @ k^T and p @ v, 2 * n * width each, per token of an n-patch image."""
    return sum(4 * width * (h * w) ** 2 for h, w in grids)


def encoder_flops_breakdown(grids: Iterable[tuple[int, int]], config: MoonVitConfig) -> dict[str, int]:
    """FLOPs per part for images of `grids` (h, w) patches; a multiply-add counts as 2."""
    c, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patch_values = 3 * config.patch_size ** 2
    merged = config.merged_hidden_size
    grids = list(grids)
    sizes = [h * w for h, w in grids]
    tokens = sum(sizes)
    flops = {
        "patch_embed": 2 * patch_values * c * tokens,
        # wqkv (c -> 3c), wo (c -> c), fc0 (c -> inter), fc1 (inter -> c).
        "layer_gemms": 2 * layers * c * (4 * c + 2 * inter) * tokens,
        "attention": layers * attention_flops(grids, c),
        "projector": 0,
    }
    if config.text_hidden_size is not None:
        flops["projector"] = 2 * merged * (merged + config.text_hidden_size) * (tokens // 4)
    return flops


def encoder_flops(grids: Iterable[tuple[int, int]], config: MoonVitConfig) -> int:
    """Total useful FLOPs of one encoder call over images of `grids` (h, w) patches."""
    return sum(encoder_flops_breakdown(grids, config).values())
