"""MoonVit configuration, with Kimi-VL-A3B's values as defaults (docs/design.md section 1.1), covering
MoonViT3d too: the tower of Kimi-K2.5 / K2.6 and, with other options, Kimi-K3 (section 8)."""

from __future__ import annotations

import json
import os
from typing import Any

try:  # transformers >= 5 renamed the base class; the old name is an alias there.
    from transformers import PreTrainedConfig as _HFConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _HFConfig


TOWERS = ("moonvit", "moonvit3d")
INTERPOLATIONS = ("bicubic", "bilinear")
NORM_TYPES = ("layernorm", "rmsnorm")
PROJECTOR_TYPES = ("patchmerger", "patchmergerv2")
BLOCK_ACTIVATIONS = ("gelu_pytorch_tanh",)


class MoonVitConfig(_HFConfig):
    """The vision tower and projector of Kimi-VL (`tower="moonvit"`) or of Kimi-K2.5 / K2.6 / K3
    (`tower="moonvit3d"`, MoonViT3d).

    Field names follow the Hugging Face `vision_config` of Kimi-VL, plus `text_hidden_size`, the
    projector's output width. `text_hidden_size=None` describes a standalone MoonViT (tower only),
    whose output stops at the merged `4 * hidden_size` features.

    MoonViT3d takes items of t frames (t = 1 for images, up to `pos_emb_time` for video chunks) and
    names its projector `mm_projector` where Kimi-VL has `multi_modal_projector`. Kimi-K2.5 / K2.6 keep
    Kimi-VL's layer options; Kimi-K3 sets `qkv_hidden_size`, RMSNorm (`norm_type="rmsnorm"`, whose eps
    is the machine epsilon of the type torch computes it in, fp32 for bf16 activations, unless
    `rms_norm_eps` is given, as `torch.nn.RMSNorm`'s default), no biases, bilinear interpolation of the table and the `patchmergerv2` projector (GELU
    MLP without pre-norm, then RMSNorm with `projector_ln_eps`).
    """

    model_type = "fused_moonvit"
    _FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "patch_size",
               "init_pos_emb_height", "init_pos_emb_width", "merge_kernel_size", "text_hidden_size",
               "layer_norm_eps", "rope_theta", "tower", "pos_emb_time", "pos_emb_interpolation", "norm_type",
               "rms_norm_eps", "attn_bias", "linear_bias", "patch_embed_proj_bias", "qkv_hidden_size",
               "projector_type", "projector_ln_eps", "hidden_act")

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
        tower: str = "moonvit",
        pos_emb_time: int = 1,
        pos_emb_interpolation: str = "bicubic",
        norm_type: str = "layernorm",
        rms_norm_eps: float | None = None,
        attn_bias: bool = True,
        linear_bias: bool = True,
        patch_embed_proj_bias: bool = True,
        qkv_hidden_size: int | None = None,
        projector_type: str = "patchmerger",
        projector_ln_eps: float = 1e-5,
        hidden_act: str = "gelu_pytorch_tanh",
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
        self.tower = str(tower)
        self.pos_emb_time = int(pos_emb_time)
        self.pos_emb_interpolation = str(pos_emb_interpolation)
        self.norm_type = str(norm_type)
        self.rms_norm_eps = None if rms_norm_eps is None else float(rms_norm_eps)
        self.attn_bias = bool(attn_bias)
        self.linear_bias = bool(linear_bias)
        self.patch_embed_proj_bias = bool(patch_embed_proj_bias)
        self.qkv_hidden_size = int(qkv_hidden_size) if qkv_hidden_size is not None else None
        self.projector_type = str(projector_type)
        self.projector_ln_eps = float(projector_ln_eps)
        self.hidden_act = str(hidden_act)
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                     "patch_size", "init_pos_emb_height", "init_pos_emb_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoonVitConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("tower", TOWERS), ("pos_emb_interpolation", INTERPOLATIONS),
                              ("norm_type", NORM_TYPES), ("projector_type", PROJECTOR_TYPES),
                              ("hidden_act", BLOCK_ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MoonVitConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.pos_emb_time < 1:
            raise ValueError(f"MoonVitConfig.pos_emb_time must be >= 1, got {self.pos_emb_time}")
        if self.tower == "moonvit" and self.pos_emb_time != 1:
            raise ValueError(f"Kimi-VL's MoonVit (tower='moonvit') takes images only, so pos_emb_time must be 1, "
                             f"got {self.pos_emb_time}; use tower='moonvit3d' for video chunks")
        if self.pos_emb_time > 1 and self.hidden_size % 2:
            raise ValueError(f"the sin-cos time embedding needs an even hidden_size, got {self.hidden_size}")
        if self.qkv_hidden_size is not None and self.qkv_hidden_size < 1:
            raise ValueError(f"MoonVitConfig.qkv_hidden_size must be >= 1 or None, got {self.qkv_hidden_size}")
        if self.attention_width % self.num_attention_heads:
            raise ValueError(
                f"the attention width {self.attention_width} (qkv_hidden_size, else hidden_size) is not "
                f"divisible by num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 4:
            # The 2D RoPE splits each head into pairs for width and pairs for height.
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for the 2D RoPE")
        if self.text_hidden_size is not None and self.text_hidden_size < 1:
            raise ValueError(f"MoonVitConfig.text_hidden_size must be >= 1 or None, got {self.text_hidden_size}")
        if self.tower == "moonvit" and self.projector_type != "patchmerger":
            raise ValueError(f"Kimi-VL's MoonVit (tower='moonvit') has the 'patchmerger' projector only, got "
                             f"{self.projector_type!r}; use tower='moonvit3d' for Kimi-K3's")
        if self.merge_kernel_size != [2, 2]:
            raise ValueError(f"only a 2x2 merge is supported, got merge_kernel_size={self.merge_kernel_size}")

    @property
    def attention_width(self) -> int:
        """Width of q, k and v each: `qkv_hidden_size` where given (Kimi-K3), else `hidden_size`."""
        return self.qkv_hidden_size if self.qkv_hidden_size is not None else self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.attention_width // self.num_attention_heads

    @property
    def projector_name(self) -> str:
        """The projector's attribute, and the checkpoint's prefix for it (the family's)."""
        from .families import family_of  # families.py builds on this module

        return family_of(self).projector_name

    @property
    def max_frames(self) -> int:
        """Frames an item may have: `pos_emb_time` (1 for Kimi-VL's images-only tower)."""
        return self.pos_emb_time

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

        A Kimi-VL config contributes its `vision_config` and `text_config.hidden_size`, and so does a
        Kimi-K2.5 / K2.6 / K3 one (`model_type` "kimi_k25" or "kimi_k3"), its vision fields read as
        Hugging Face and vLLM name them (`moonvit3d_fields`); a standalone
        MoonViT config (no `vision_config`) gives a tower without projector unless it names a
        `text_hidden_size` (as one saved by `save_pretrained` does). Hub names are not fetched.
        """
        from .families import family_of_model_type, titles  # families.py builds on this module

        cfg_path = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in model directory {os.fspath(path)!r}; a model directory of "
                                    f"{titles()} (or of a standalone MoonViT tower) holds config.json and the "
                                    f"weights (model.safetensors, or model.safetensors.index.json and its shards)")
        with open(cfg_path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{cfg_path} does not hold a JSON object, which a config of {titles()} is")
        family = family_of_model_type(raw.get("model_type"))
        if "vision_config" not in raw and family is not None:
            raise ValueError(f"{cfg_path} names model_type {raw['model_type']!r} ({family.title}) but has no "
                             f"vision_config, which holds the encoder's settings in configs of {titles()}")
        if "vision_config" not in raw and not any(k in raw for k in cls._FIELDS):
            raise ValueError(f"{cfg_path} describes no model this encoder reads: no vision_config, as configs of "
                             f"{titles()} have, and none of a standalone MoonViT tower's fields "
                             f"({', '.join(cls._FIELDS[:4])}, ...)")
        if "vision_config" in raw:
            vision = dict(raw["vision_config"])
            text = raw.get("text_config") or {}
            if "hidden_size" not in text:
                raise ValueError(f"{cfg_path} has a vision_config but no text_config.hidden_size (the projector's "
                                 f"output width), which configs of {titles()} have")
            if family is not None or _is_moonvit3d(vision):
                try:
                    vision = (family.vision_fields if family is not None else moonvit3d_fields)(vision)
                except ValueError as err:
                    raise ValueError(f"{cfg_path}: {err}") from None
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


# Vision-config fields only MoonViT3d has; a vision_config with any of them is read as MoonViT3d.
_MOONVIT3D_MARKERS = ("pos_emb_time", "init_pos_emb_time", "vt_hidden_size", "mm_projector_type", "merge_type")
# Options MoonViT3d's code defines with one supported value (vLLM 0.34 and transformers 5.22 raise on others).
_ONLY = {"pos_emb_type": "divided_fixed", "merge_type": "sd2_tpool", "video_attn_type": "spatial_temporal",
         "mlp_type": "mlp2"}


def _is_moonvit3d(vision: dict) -> bool:
    # A vision_config saved from MoonVitConfig names its tower, and Kimi-VL's holds pos_emb_time=1 too.
    if "tower" in vision:
        return vision["tower"] == "moonvit3d"
    return any(k in vision for k in _MOONVIT3D_MARKERS)


def _first(vision: dict, names: tuple[str, ...], default: Any) -> Any:
    return next((vision[n] for n in names if vision.get(n) is not None), default)


def moonvit3d_fields(vision: dict) -> dict:
    """MoonVitConfig fields from a MoonViT3d `vision_config` as Kimi-K2.5 / K2.6 (`pos_emb_*`, or the
    legacy `init_pos_emb_*`) and Kimi-K3 (`vt_*`, `init_pos_emb_*`) checkpoints write it. Options missing
    take the value vLLM's MoonViT3d assumes; an option whose value vLLM does not support fails here."""
    for name, only in _ONLY.items():
        if vision.get(name, only) != only:
            raise ValueError(f"vision_config.{name} must be {only!r} (the only value MoonViT3d supports), "
                             f"got {vision[name]!r}")
    if "merge_kernel_size" in vision:
        merge = list(vision["merge_kernel_size"])
    else:
        merge = [2, 2]
    fields = {
        "tower": "moonvit3d",
        "patch_size": vision.get("patch_size", 14),
        "init_pos_emb_height": _first(vision, ("init_pos_emb_height", "pos_emb_height"), 64),
        "init_pos_emb_width": _first(vision, ("init_pos_emb_width", "pos_emb_width"), 64),
        "pos_emb_time": _first(vision, ("init_pos_emb_time", "pos_emb_time"), 4),
        "num_attention_heads": _first(vision, ("vt_num_attention_heads", "num_attention_heads"), 16),
        "num_hidden_layers": _first(vision, ("vt_num_hidden_layers", "num_hidden_layers"), 27),
        "hidden_size": _first(vision, ("vt_hidden_size", "hidden_size"), 1152),
        "intermediate_size": _first(vision, ("vt_intermediate_size", "intermediate_size"), 4304),
        "merge_kernel_size": merge,
        "hidden_act": _first(vision, ("activation_func", "hidden_act"), "gelu_pytorch_tanh"),
        "qkv_hidden_size": vision.get("qkv_hidden_size"),
        "norm_type": vision.get("norm_type", "layernorm"),
        "attn_bias": vision.get("attn_bias", True),
        "linear_bias": vision.get("linear_bias", True),
        "patch_embed_proj_bias": vision.get("patch_embed_proj_bias", True),
        "pos_emb_interpolation": vision.get("pos_emb_interpolation_mode", "bicubic"),
        "projector_type": vision.get("mm_projector_type", "patchmerger"),
        "projector_ln_eps": vision.get("projector_ln_eps", 1e-5),
    }
    # The RoPE base stays 10000: vLLM's MoonViT3d hard-codes it.
    return fields
