"""`MoonVitReference`: eager PyTorch MoonVit, exact to DESIGN.md §1.

This is the golden reference for every test and the "reference eager" baseline in benchmarks. It does
the per-image work the way the Hugging Face semantics do (bicubic per image, rotary per layer, merge per
image) and keeps attention strictly inside each image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import sdpa_per_sequence
from .config import MoonVitConfig
from .inputs import check_inputs, patch_offsets


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The 2D RoPE's `head_dim // 4` fp32 frequencies, computed as vLLM and Hugging Face do.

    Positions reach 511, so an ulp off here moves angles by ~1e-5: every implementation in this
    project takes its frequencies from this one function.
    """
    exponents = torch.arange(0, head_dim, 4, dtype=torch.float32)[: head_dim // 4] / head_dim
    return 1.0 / (theta ** exponents)


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


def interpolate_pos_table(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h * w, C) position embedding of an h x w grid, bicubic from the (H0, W0, C) table.

    Computed in fp32 and rounded once to the table's dtype, which is what PyTorch's bicubic kernel
    does for bf16 on CUDA (fp32 accumulation), and is device-independent.
    """
    if (h, w) == tuple(table.shape[:2]):
        return table.flatten(0, 1)
    grid = F.interpolate(table.float().permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False)
    return grid[0].permute(1, 2, 0).flatten(0, 1).to(table.dtype)


def grid_positions(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch of an h x w image, row-major."""
    idx = torch.arange(h * w, device=device)
    return idx // w, idx % w


def merge_2x2(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h * w, C) -> (h/2 * w/2, 4, C): merged tokens row-major, sub-tokens (0,0),(0,1),(1,0),(1,1)."""
    c = x.shape[-1]
    return x.view(h // 2, 2, w // 2, 2, c).permute(0, 2, 1, 3, 4).reshape(-1, 4, c)


class PositionTable(nn.Module):
    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(height, width, dim))
        nn.init.normal_(self.weight)


class PatchEmbed(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_emb = PositionTable(config.init_pos_emb_height, config.init_pos_emb_width, config.hidden_size)


class MLP(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.norm0 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.norm1 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.wqkv = nn.Linear(c, 3 * c)
        self.wo = nn.Linear(c, c)
        self.mlp = MLP(config)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        q, k, v = self.wqkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(1)
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        return self.wo(sdpa_per_sequence(q, k, v, bounds).flatten(1))

    def forward(self, x, cos, sin, bounds):
        x = x + self.attention(self.norm0(x), cos, sin, bounds)
        return x + self.mlp(self.norm1(x))


class Encoder(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class VisionTower(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        self.encoder = Encoder(config)


class Projector(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        merged = config.merged_hidden_size
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, config.text_hidden_size)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """(M, 4, C) sub-tokens -> (M, text_hidden_size)."""
        x = self.pre_norm(merged).flatten(1)
        return self.linear_2(F.gelu(self.linear_1(x)))


class MoonVitModules(nn.Module):
    """The encoder's parameters, under the Kimi-VL checkpoint's names (`vision_tower.…`,
    `multi_modal_projector.…`); every model class here shares them, so any one's state dict loads into
    any other. With `config.text_hidden_size=None` there is no projector."""

    def __init__(self, config: MoonVitConfig | None = None):
        super().__init__()
        self.config = config if config is not None else MoonVitConfig()
        self.vision_tower = VisionTower(self.config)
        self.multi_modal_projector = Projector(self.config) if self.config.text_hidden_size is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.patch_embed.proj.weight.device


class MoonVitReference(MoonVitModules):
    """Eager MoonVit: `forward(pixel_values (N,3,p,p), grid_hws (n,2)) -> (sum h/2*w/2, output_size)`.

    Without a projector the output is the merged `(M, 4 * hidden_size)` features, sub-tokens in
    (0,0),(0,1),(1,0),(1,1) order.
    """

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, grid_hws) -> torch.Tensor:
        grid = check_inputs(pixel_values, grid_hws, self.config.patch_size).tolist()
        tower = self.vision_tower
        x = tower.patch_embed.proj(pixel_values.to(self.dtype)).flatten(1)

        table = tower.patch_embed.pos_emb.weight
        positions = [grid_positions(h, w, x.device) for h, w in grid]
        x = x + torch.cat([interpolate_pos_table(table, h, w) for h, w in grid])
        # Not a buffer: `model.to(bfloat16)` would round the frequencies.
        freqs = rope_frequencies(self.config.head_dim, self.config.rope_theta).to(x.device)
        angles = rope_angles(torch.cat([r for r, _ in positions]), torch.cat([c for _, c in positions]), freqs)
        cos, sin = angles.cos(), angles.sin()
        bounds = patch_offsets(grid)
        for block in tower.encoder.blocks:
            x = block(x, cos, sin, bounds)
        x = tower.encoder.final_layernorm(x)

        merged = torch.cat([merge_2x2(x[start:end], h, w) for start, end, (h, w) in zip(bounds, bounds[1:], grid)])
        if self.multi_modal_projector is None:
            return merged.flatten(1)
        return self.multi_modal_projector(merged)
