"""MoonVit configuration, with Kimi-VL-A3B's values as defaults (docs/design.md section 1.1)."""

from __future__ import annotations

import json
import os
from typing import Any

try:  # transformers >= 5 renamed the base class; the old name is an alias there.
    from transformers import PreTrainedConfig as _HFConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _HFConfig


class MoonVitConfig(_HFConfig):
    """The vision tower and projector of Kimi-VL.

    Field names follow the Hugging Face `vision_config` of Kimi-VL, plus `text_hidden_size`, the
    projector's output width. `text_hidden_size=None` describes a standalone MoonViT (tower only),
    whose output stops at the merged `4 * hidden_size` features.
    """

    model_type = "fused_moonvit"
    _FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "patch_size",
               "init_pos_emb_height", "init_pos_emb_width", "merge_kernel_size", "text_hidden_size",
               "layer_norm_eps", "rope_theta")

    def __init__(
        self,
        num_hidden_layers: int = 27,
        hidden_size: int = 1152,
        num_attention_heads: int = 16,
        intermediate_size: int = 4304,
        patch_size: int = 14,
        init_pos_emb_height: int = 64,
        init_pos_emb_width: int = 64,
        merge_kernel_size: tuple[int, int] | list[int] = (2, 2),
        text_hidden_size: int | None = 2048,
        layer_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        **kwargs: Any,
    ):
        self.num_hidden_layers = int(num_hidden_layers)
        self.hidden_size = int(hidden_size)
        self.num_attention_heads = int(num_attention_heads)
        self.intermediate_size = int(intermediate_size)
        self.patch_size = int(patch_size)
        self.init_pos_emb_height = int(init_pos_emb_height)
        self.init_pos_emb_width = int(init_pos_emb_width)
        self.merge_kernel_size = [int(k) for k in merge_kernel_size]
        self.text_hidden_size = None if text_hidden_size is None else int(text_hidden_size)
        self.layer_norm_eps = float(layer_norm_eps)
        self.rope_theta = float(rope_theta)
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                     "patch_size", "init_pos_emb_height", "init_pos_emb_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoonVitConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}")
        if self.head_dim % 4:
            # The 2D RoPE splits each head into pairs for width and pairs for height.
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for the 2D RoPE")
        if self.text_hidden_size is not None and self.text_hidden_size < 1:
            raise ValueError(f"MoonVitConfig.text_hidden_size must be >= 1 or None, got {self.text_hidden_size}")
        if self.merge_kernel_size != [2, 2]:
            raise ValueError(f"only a 2x2 merge is supported, got merge_kernel_size={self.merge_kernel_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merged_hidden_size(self) -> int:
        return self.hidden_size * self.merge_kernel_size[0] * self.merge_kernel_size[1]

    @property
    def output_size(self) -> int:
        """Width of one output token: the text width, or the merged width without a projector."""
        return self.text_hidden_size if self.text_hidden_size is not None else self.merged_hidden_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "MoonVitConfig":
        """Reads a local model directory's `config.json`.

        A Kimi-VL config contributes its `vision_config` and `text_config.hidden_size`; a standalone
        MoonViT config (no `vision_config`) gives a tower without projector unless it names a
        `text_hidden_size` (as one saved by `save_pretrained` does). Hub names are not fetched.
        """
        cfg_path = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in model directory {os.fspath(path)!r}; a Kimi-VL or MoonViT "
                                    f"model directory holds config.json and the weights (model.safetensors, or "
                                    f"model.safetensors.index.json and its shards)")
        with open(cfg_path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict) or not ("vision_config" in raw or any(k in raw for k in cls._FIELDS)):
            raise ValueError(f"{cfg_path} describes neither Kimi-VL (it has no vision_config) nor a MoonViT tower "
                             f"(it has none of {', '.join(cls._FIELDS[:4])}, ...)")
        if "vision_config" in raw:
            vision = dict(raw["vision_config"])
            text = raw.get("text_config") or {}
            if "hidden_size" not in text:
                raise ValueError(f"{cfg_path}: a Kimi-VL config needs text_config.hidden_size")
            vision["text_hidden_size"] = text["hidden_size"]
        else:
            vision = dict(raw)
            vision.setdefault("text_hidden_size", None)
        fields = {k: v for k, v in vision.items() if k in cls._FIELDS}
        fields.update(overrides)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{cfg_path}: {err}") from None
