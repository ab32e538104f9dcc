"""The MoonVit encoder's parameters as modules, under the checkpoint's names (Kimi-VL's, or Kimi-K2.5's
and K3's for MoonViT3d, whose projector is `mm_projector` with `proj.0` and `proj.2` for its linears);
which projector a config gets is its family's (families.py).

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


def time_embedding(frames: int, dim: int) -> torch.Tensor:
    """MoonViT3d's fixed (frames, dim) fp32 time embedding: for frame f, sin(f * w_i) for i < dim/2, then
    cos(f * w_i), with w_i = 10000^(-i / (dim/2)); each step rounded to fp32 as vLLM's numpy code does."""
    omega = torch.arange(dim // 2, dtype=torch.float32) / torch.tensor(dim / 2.0, dtype=torch.float32)
    omega = 1.0 / torch.pow(torch.tensor(10000.0, dtype=torch.float32), omega)
    angles = torch.arange(frames, dtype=torch.float32)[:, None] * omega[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def make_norm(config: MoonVitConfig, dim: int) -> nn.Module:
    """The blocks' norm: LayerNorm(eps=layer_norm_eps), or RMSNorm (eps=rms_norm_eps; None is
    torch.nn.RMSNorm's default, which vLLM's MoonViT3d uses: see `norm_eps`)."""
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.rms_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


def norm_eps(norm: nn.Module, dtype: torch.dtype) -> float:
    """The epsilon `norm` applies to inputs of `dtype`. For eps=None, torch's RMSNorm takes the machine
    epsilon of the type it computes in, fp32 for bf16 and fp16 inputs (ATen's opmath type; its docs say
    the input's dtype, but 2^-7 is not what a bf16 input gets), so 2^-23 for every dtype the encoder runs."""
    eps = norm.eps
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps if eps is None else float(eps)


class PatchEmbed(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size,
                              bias=config.patch_embed_proj_bias)
        self.pos_emb = PositionTable(config.init_pos_emb_height, config.init_pos_emb_width, config.hidden_size)
        # Not a buffer: `.to(bfloat16)` would round it; users take it through `time_table(device)`.
        self._time = time_embedding(config.pos_emb_time, config.hidden_size) if config.pos_emb_time > 1 else None

    def time_table(self, device: torch.device) -> torch.Tensor | None:
        """The fp32 (pos_emb_time, hidden) time embedding on `device`, or None for an images-only tower."""
        if self._time is not None and self._time.device != torch.device(device):
            self._time = self._time.to(device)
        return self._time


class MLP(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.linear_bias)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.linear_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        c, a = config.hidden_size, config.attention_width
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.norm0 = make_norm(config, c)
        self.norm1 = make_norm(config, c)
        self.wqkv = nn.Linear(c, 3 * a, bias=config.attn_bias)
        self.wo = nn.Linear(a, c, bias=config.attn_bias)
        self.mlp = MLP(config)


class Encoder(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = make_norm(config, config.hidden_size)


class VisionTower(nn.Module):
    def __init__(self, config: MoonVitConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        self.encoder = Encoder(config)


def norm_args(norm: nn.Module, dtype: torch.dtype) -> dict:
    """`kernels.layernorm.add_layer_norm`'s arguments for a LayerNorm or RMSNorm module; an RMSNorm
    without eps uses torch's default (`norm_eps`)."""
    rms = isinstance(norm, nn.RMSNorm)
    return dict(weight=norm.weight, ln_bias=None if rms else norm.bias, eps=norm_eps(norm, dtype), rms=rms)


# Each projector owns its fused forward, `fused_forward(h, token_meta, max_frames)`: the final-norm
# output (B, C) of the fused tower and its expanded plan -> (B/4, text width). The kernels are imported
# there, on the first fused call, so that the eager reference never imports Triton (see __init__.py).


class Projector(nn.Module):
    """Kimi-VL's projector: pre-norm LayerNorm of each sub-token, then Linear, GELU (erf), Linear."""

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

    def fused_forward(self, h: torch.Tensor, token_meta: torch.Tensor, max_frames: int) -> torch.Tensor:
        from fused_moonvit.kernels.patch_merge import merge_patches

        norm = self.pre_norm  # fused into the merge's gather
        merged = merge_patches(h, token_meta, ln_weight=norm.weight, ln_bias=norm.bias, eps=norm.eps,
                               max_frames=max_frames)
        return self.linear_2(F.gelu(self.linear_1(merged)))


class PatchMerger(nn.Module):
    """Kimi-K2.5 / K2.6's MoonViT3d projector ("patchmerger"), under the checkpoint's names (`proj.0`,
    `proj.2`): as Kimi-VL's, pre-norm LayerNorm of each sub-token, then Linear, GELU (erf), Linear."""

    def __init__(self, config: MoonVitConfig):
        super().__init__()
        merged = config.merged_hidden_size
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.proj = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.text_hidden_size))

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """(M, 4, C) sub-tokens -> (M, text_hidden_size)."""
        return self.proj(self.pre_norm(merged).flatten(1))

    def fused_forward(self, h: torch.Tensor, token_meta: torch.Tensor, max_frames: int) -> torch.Tensor:
        from fused_moonvit.kernels.patch_merge import merge_patches

        norm = self.pre_norm  # fused into the merge's gather
        merged = merge_patches(h, token_meta, ln_weight=norm.weight, ln_bias=norm.bias, eps=norm.eps,
                               max_frames=max_frames)
        return self.proj[2](self.proj[1](self.proj[0](merged)))


class PatchMergerV2(nn.Module):
    """Kimi-K3's projector ("patchmergerv2"), under the checkpoint's names: no pre-norm, Linear, GELU
    (erf), Linear without biases, then RMSNorm(text width, eps=projector_ln_eps)."""

    def __init__(self, config: MoonVitConfig):
        super().__init__()
        merged = config.merged_hidden_size
        self.proj = nn.Sequential(nn.Linear(merged, merged, bias=False), nn.GELU(),
                                  nn.Linear(merged, config.text_hidden_size, bias=False))
        self.post_norm = nn.RMSNorm(config.text_hidden_size, eps=config.projector_ln_eps)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """(M, 4, C) sub-tokens -> (M, text_hidden_size)."""
        return self.post_norm(self.proj(merged.flatten(1)))

    def fused_forward(self, h: torch.Tensor, token_meta: torch.Tensor, max_frames: int) -> torch.Tensor:
        from fused_moonvit.kernels.layernorm import add_layer_norm
        from fused_moonvit.kernels.patch_merge import merge_patches

        out = self.proj[2](self.proj[1](self.proj[0](merge_patches(h, token_meta, max_frames=max_frames))))
        return add_layer_norm(out, None, **norm_args(self.post_norm, out.dtype))


class MoonVitModules(nn.Module):
    """The encoder's parameters, under the checkpoint's names (`vision_tower.…`, and
    `multi_modal_projector.…` for Kimi-VL or `mm_projector.…` for MoonViT3d); every model class here
    shares them, so any one's state dict loads into any other. With `config.text_hidden_size=None` there
    is no projector."""

    def __init__(self, config: MoonVitConfig | None = None):
        super().__init__()
        self.config = config if config is not None else MoonVitConfig()
        self.vision_tower = VisionTower(self.config)
        from .families import family_of  # families.py declares this module's projectors

        family = family_of(self.config)
        projector = None if self.config.text_hidden_size is None else family.projector(self.config)
        setattr(self, family.projector_name, projector)

    @property
    def projector(self) -> nn.Module | None:
        """The projector (`multi_modal_projector` or `mm_projector`), None for a tower alone."""
        return getattr(self, self.config.projector_name)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.patch_embed.proj.weight.device
