"""The MoonVit encoder's parameters as modules, under the Kimi-VL checkpoint's names.

Every model class here (the eager `MoonVitReference`, the fused `FusedMoonVit`) is built on
`MoonVitModules`, so any one's state dict loads into any other; each class supplies its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoonVitConfig


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The 2D RoPE's `head_dim // 4` fp32 frequencies, computed as vLLM and Hugging Face do.

    Positions reach 511, so an ulp off here moves angles by ~1e-5: every implementation in this
    project takes its frequencies from this one function.
    """
    exponents = torch.arange(0, head_dim, 4, dtype=torch.float32)[: head_dim // 4] / head_dim
    return 1.0 / (theta ** exponents)


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
