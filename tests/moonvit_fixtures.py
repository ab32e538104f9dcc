"""Helpers shared by the suite: small configs, random models and images, synthetic checkpoints."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from fused_moonvit.moonvit import MoonVitConfig, MoonVitReference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_config(**overrides) -> MoonVitConfig:
    """A small MoonVit with the real structure: 2 layers, 4 heads of 8, a 16x16 position table."""
    fields = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                  init_pos_emb_height=16, init_pos_emb_width=16, text_hidden_size=24)
    fields.update(overrides)
    return MoonVitConfig(**fields)


def random_model(config: MoonVitConfig, seed: int, dtype=torch.float32) -> MoonVitReference:
    """A reference model whose every parameter, biases and norms too, is drawn at random."""
    torch.manual_seed(seed)
    model = MoonVitReference(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("pos_emb.weight"):
                p.copy_(torch.randn_like(p))
            elif p.dim() > 1:
                p.copy_(torch.randn_like(p) / (p.numel() // p.shape[0]) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def random_pixels(grid_hws, patch_size: int = 14, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(math.prod(g) for g in grid_hws)
    return torch.randn(n, 3, patch_size, patch_size, generator=g)


def write_checkpoint(directory, tensors: dict, config: dict, shards: int = 1) -> None:
    """Writes `config.json` plus `model.safetensors`, or `shards` files and an index."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(directory, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def kimi_vl_config_json(config: MoonVitConfig) -> dict:
    """A Kimi-VL style config.json for `config` (vision_config plus text_config.hidden_size)."""
    vision = {k: getattr(config, k) for k in MoonVitConfig._FIELDS if k not in ("text_hidden_size",)}
    vision["model_type"] = "moonvit"
    return {"model_type": "kimi_vl", "architectures": ["KimiVLForConditionalGeneration"],
            "vision_config": vision, "text_config": {"hidden_size": config.text_hidden_size}}
