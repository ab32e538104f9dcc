"""Building a MoonVit model class from a local checkpoint directory, or with seeded random weights."""

from __future__ import annotations

import os
from typing import TypeVar

import torch
from torch import nn

from .checkpoint import load_encoder_state
from .config import MoonVitConfig

M = TypeVar("M", bound=nn.Module)


def build_model(cls: type[M], model_dir: str | os.PathLike | None = None, *, config: MoonVitConfig | None = None,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0) -> M:
    """`cls(config)` on `device` in `dtype`, filled from `model_dir`, or seeded random weights without it."""
    if model_dir is not None:
        config = MoonVitConfig.from_pretrained(model_dir) if config is None else config
    elif config is None:
        config = MoonVitConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model = model.to(device=device, dtype=dtype).eval()
    if model_dir is not None:
        load_encoder_state(model, model_dir)
    return model
