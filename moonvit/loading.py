"""Building a MoonVit model class from a local checkpoint directory, or with seeded random weights."""

from __future__ import annotations

import os
from typing import TypeVar

import torch
from torch import nn

from .checkpoint import load_encoder_state, match_checkpoint
from .config import MoonVitConfig
from .families import KIMI_VL, family_named, family_of
from .modules import MoonVitModules

M = TypeVar("M", bound=nn.Module)


def check_model_dir(model_dir: str | os.PathLike, config: MoonVitConfig | None = None,
                    cls: type[nn.Module] = MoonVitModules) -> MoonVitConfig:
    """Reads `model_dir`'s config.json (unless `config` is given) and checks its checkpoint's encoder
    tensors, names and shapes, against `cls(config)`'s state dict; returns the config.

    Only config.json and the safetensors headers are read, and the parameters are laid out on the meta
    device, so a bad directory fails in well under a second, before a model is built.
    """
    config = MoonVitConfig.from_pretrained(model_dir) if config is None else config
    with torch.device("meta"):
        expected = cls(config).state_dict()
    match_checkpoint(model_dir, {k: v.shape for k, v in expected.items()}, config.projector_name)
    return config


def build_model(cls: type[M], model_dir: str | os.PathLike | None = None, *, family: str | None = None,
                config: MoonVitConfig | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0) -> M:
    """`cls(config)` on `device` in `dtype`, filled from `model_dir`, or seeded random weights without it.

    Without `model_dir`, the random weights take `config`, else the real-size architecture of `family`
    ("kimi-vl", the default; "kimi-k25" for Kimi-K2.5 / K2.6; "kimi-k3" for Kimi-K3 / K3.1). With
    `model_dir`, its config.json says what the model is, and `family`, if given, must be the one it
    declares, so that one call serves both. A checkpoint that does not fit the config fails before the
    model is built (`check_model_dir`).
    """
    wanted = None
    if family is not None:
        wanted = family_named(family)
        if config is not None:
            raise ValueError(f"give family={family!r} or config, not both: the family stands for its "
                             f"real-size config")
    if model_dir is not None:
        if config is None:
            config = MoonVitConfig.from_pretrained(model_dir)
        if wanted is not None and family_of(config) is not wanted:
            raise ValueError(f"{os.fspath(model_dir)} holds a {family_of(config).title} model (its config.json), "
                             f"not family {family!r} ({wanted.title})")
        config = check_model_dir(model_dir, config, cls)
    elif config is None:
        config = (wanted or KIMI_VL).real_size_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model = model.to(device=device, dtype=dtype).eval()
    if model_dir is not None:
        load_encoder_state(model, model_dir)
    return model
