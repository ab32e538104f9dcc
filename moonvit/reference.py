"""`MoonVitReference`: eager PyTorch MoonVit, exactly as docs/design.md sections 1 and 2 describe it.

This is the golden reference for every test and the "reference eager" baseline in benchmarks. It does
the per-image work the way the Hugging Face semantics do (bicubic per image, rotary per layer, merge per
image) and keeps attention strictly inside each image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import sdpa_per_sequence
from .inputs import check_inputs
from .modules import EncoderBlock, MoonVitModules, rope_frequencies


def rope_angles(rows: torch.Tensor, cols: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(tokens, head_dim // 2) fp32 angles: pair 2i turns by col * f_i, pair 2i + 1 by row * f_i."""
    by_col = cols.float()[:, None] * freqs
    by_row = rows.float()[:, None] * freqs
    return torch.stack((by_col, by_row), dim=-1).flatten(1)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent (real, imag) pairs of x (tokens, heads, head_dim) in fp32, one rounding."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf.unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).to(x.dtype)


def interpolate_pos_table(table: torch.Tensor, h: int, w: int, mode: str = "bicubic") -> torch.Tensor:
    """(h * w, C) position embedding of an h x w grid, bicubic (or bilinear) from the (H0, W0, C) table.

    Computed in fp32 and rounded once to the table's dtype, which is what PyTorch's bicubic kernel
    does for bf16 on CUDA (fp32 accumulation), and is device-independent.
    """
    if (h, w) == tuple(table.shape[:2]):
        return table.flatten(0, 1)
    grid = F.interpolate(table.float().permute(2, 0, 1)[None], size=(h, w), mode=mode, align_corners=False)
    return grid[0].permute(1, 2, 0).flatten(0, 1).to(table.dtype)


def grid_positions(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch of an h x w image, row-major."""
    idx = torch.arange(h * w, device=device)
    return idx // w, idx % w


def merge_2x2(x: torch.Tensor, h: int, w: int, t: int = 1) -> torch.Tensor:
    """(t * h * w, C) -> (h/2 * w/2, 4, C): the mean over the t frames (one rounding; the identity for
    t = 1), then merged tokens row-major, sub-tokens (0,0),(0,1),(1,0),(1,1)."""
    c = x.shape[-1]
    x = x.view(t, h * w, c)
    x = x[0] if t == 1 else x.mean(dim=0)
    return x.view(h // 2, 2, w // 2, 2, c).permute(0, 2, 1, 3, 4).reshape(-1, 4, c)


def block_forward(block: EncoderBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  bounds: list[int]) -> torch.Tensor:
    """One pre-norm block: rotary on q and k, attention inside each [bounds[i], bounds[i+1]) image."""
    q, k, v = block.wqkv(block.norm0(x)).unflatten(-1, (3, block.num_heads, block.head_dim)).unbind(1)
    q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
    x = x + block.wo(sdpa_per_sequence(q, k, v, bounds).flatten(1))
    return x + block.mlp(block.norm1(x))


class MoonVitReference(MoonVitModules):
    """Eager MoonVit and MoonViT3d: `forward(pixel_values (N,3,p,p), grid (n,2) of (h,w) or (n,3) of
    (t,h,w)) -> (sum h/2*w/2, output_size)`.

    An item of t frames (MoonViT3d's video chunks) adds the time embedding of its frame to each token,
    attends across all its t*h*w tokens and averages its frames before the merge. Without a projector
    the output is the merged `(M, 4 * hidden_size)` features, sub-tokens in (0,0),(0,1),(1,0),(1,1)
    order.
    """

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, items) -> torch.Tensor:
        cfg = self.config
        items = check_inputs(pixel_values, items, cfg.patch_size, cfg.max_frames)
        tower = self.vision_tower
        x = tower.patch_embed.proj(pixel_values.to(self.dtype)).flatten(1)

        table = tower.patch_embed.pos_emb.weight
        time = tower.patch_embed.time_table(x.device)
        embeds = []
        for t, h, w in items:
            pe = interpolate_pos_table(table, h, w, cfg.pos_emb_interpolation)
            # A chunk's embedding is the 2D one plus its frame's fp32 time embedding, added in fp32.
            embeds.append(pe if t == 1 else (pe.float()[None] + time[:t, None]).flatten(0, 1))
        pe = torch.cat(embeds)
        x = x + pe if pe.dtype == x.dtype else (x.float() + pe.float()).to(x.dtype)

        positions = [grid_positions(h, w, x.device) for _, h, w in items]
        rows = torch.cat([r.repeat(t) for (t, _, _), (r, _) in zip(items, positions)])
        cols = torch.cat([c.repeat(t) for (t, _, _), (_, c) in zip(items, positions)])
        # Not a buffer: `model.to(bfloat16)` would round the frequencies.
        freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta).to(x.device)
        angles = rope_angles(rows, cols, freqs)
        cos, sin = angles.cos(), angles.sin()
        bounds = items.offsets
        for block in tower.encoder.blocks:
            x = block_forward(block, x, cos, sin, bounds)
        x = tower.encoder.final_layernorm(x)

        merged = torch.cat([merge_2x2(x[start:end], h, w, t)
                            for start, end, (t, h, w) in zip(bounds, bounds[1:], items)])
        if self.projector is None:
            return merged.flatten(1)
        return self.projector(merged)
