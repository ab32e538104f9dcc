"""`FusedKimiVLForConditionalGeneration`: vLLM's Kimi-VL model with the fused MoonVit encoder.

A subclass of vLLM's `KimiVLForConditionalGeneration`, so the processor registration, the language model,
the weight loader and everything else about serving stay vLLM's. Only the vision tower and projector are
ours: one `FusedMoonVit`, whose two halves sit at `vision_tower` and `multi_modal_projector` with the
checkpoint's parameter names, so vLLM's `AutoWeightsLoader` fills them like any plain module.

What Kimi-VL shares with the other drop-ins (construction, refusals, the weight check, the encoder
CUDA-graph protocol) is `drop_in.FusedEncoderDropIn`'s. Tested on vLLM 0.33.0 and 0.34.0.
"""

from __future__ import annotations

import inspect  # noqa: F401  (tests watch `inspect.signature` through this module)

import torch
from vllm.model_executor.models import kimi_vl as vllm_kimi_vl
from vllm.model_executor.models.vision import run_dp_sharded_mrope_vision_model

from fused_moonvit.integration.drop_in import FusedEncoderDropIn, FusedTowerConstructors, parent_init_with
from fused_moonvit.integration.drop_in import protocol_signature as _protocol_signature  # noqa: F401
from fused_moonvit.integration.encoder_graph import PATCHES_PER_TOKEN
from fused_moonvit.moonvit.config import MoonVitConfig
from fused_moonvit.moonvit.fused import FusedMoonVit

# The fields vLLM's MoonViTConfig defines; vLLM hard-codes the LayerNorm eps and RoPE base that
# MoonVitConfig's defaults already match.
_VISION_FIELDS = ("patch_size", "init_pos_emb_height", "init_pos_emb_width", "num_attention_heads",
                  "num_hidden_layers", "hidden_size", "intermediate_size", "merge_kernel_size")

# The names the parent's __init__ builds its tower with, and the attributes it assigns the results to
# (which are the checkpoint's names for the encoder's parameters).
_TOWER_CONSTRUCTORS = {"MoonVitPretrainedModel": "vision_tower",
                       "KimiVLMultiModalProjector": "multi_modal_projector"}


def moonvit_config(hf_config) -> MoonVitConfig:
    """Our encoder's config from vLLM's `KimiVLConfig`."""
    vision = hf_config.vision_config
    return MoonVitConfig(**{k: getattr(vision, k) for k in _VISION_FIELDS},
                         text_hidden_size=hf_config.text_config.hidden_size)


def _tower_constructors(config: MoonVitConfig, model_prefix: str) -> FusedTowerConstructors:
    """The stand-ins for Kimi-VL's two tower constructors (one FusedMoonVit, built on first use)."""
    return FusedTowerConstructors(config, model_prefix, _TOWER_CONSTRUCTORS, "KimiVLForConditionalGeneration",
                                  FusedKimiVLForConditionalGeneration.build_encoder)


def _parent_init_with(constructors: FusedTowerConstructors):
    return parent_init_with(vllm_kimi_vl.KimiVLForConditionalGeneration, constructors)


class _DataParallelView:
    """What `run_dp_sharded_mrope_vision_model` reads of a vision model, for the fused encoder.

    Its "rope_3d" layout is the one for an encoder that returns (tokens, hidden) with the merge already
    folded in, as ours does (projector included); its "rope_2d" layout expects MoonVit's pre-projector
    (tokens, 4, hidden) features. (It sizes an item's output as t * h * w / 4 tokens, right for Kimi-VL's
    images; `drop_in.encode_data_parallel` serves items of several frames.)
    """

    spatial_merge_size = 2

    def __init__(self, encoder: FusedMoonVit):
        self.encoder = encoder
        self.out_hidden_size = encoder.config.output_size

    @property
    def dtype(self) -> torch.dtype:
        # vLLM 0.34 sizes the placeholders of ranks without images by it; 0.33 by the first parameter.
        return self.encoder.dtype

    def parameters(self):
        return self.encoder.parameters()

    def __call__(self, pixel_values: torch.Tensor, grid_hws) -> torch.Tensor:
        return self.encoder(pixel_values, grid_hws)


class FusedKimiVLForConditionalGeneration(FusedEncoderDropIn, vllm_kimi_vl.KimiVLForConditionalGeneration):
    """vLLM's Kimi-VL with the fused MoonVit encoder as its vision tower and projector."""

    vllm_class = vllm_kimi_vl.KimiVLForConditionalGeneration
    tower_constructors = _TOWER_CONSTRUCTORS
    grid_key = "image_grid_hws"
    graph_modalities = ["image"]

    @classmethod
    def moonvit_config(cls, hf_config) -> MoonVitConfig:
        return moonvit_config(hf_config)

    @classmethod
    def build_encoder(cls, config: MoonVitConfig) -> FusedMoonVit:
        return FusedMoonVit(config)  # this module's name, looked up per call (tests substitute it)

    def __init__(self, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config, prefix)
        self._dp_view = _DataParallelView(self.fused_encoder)

    # -- eager path (embed_multimodal) --

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        pixel_values = image_input["pixel_values"]
        grid = image_input["image_grid_hws"].tolist()
        if self.use_data_parallel:
            return run_dp_sharded_mrope_vision_model(self._dp_view, pixel_values, grid, rope_type="rope_3d")
        tokens = [h * w // PATCHES_PER_TOKEN for h, w in grid]
        return self.encode(pixel_values, grid).split(tokens)
