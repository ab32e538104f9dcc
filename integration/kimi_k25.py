"""`FusedKimiK25ForConditionalGeneration`: vLLM's Kimi-K2.5 / K2.6 model with the fused MoonViT3d encoder.

A subclass of vLLM's `KimiK25ForConditionalGeneration` (vLLM 0.33.0 and 0.34.0 ship the same one), so
the processor, the language model, the weight loader and everything else about serving stay vLLM's. The
vision tower and projector are one `FusedMoonVit` of a MoonViT3d config, whose two halves sit at
`vision_tower` and `mm_projector` under the checkpoint's names; construction, refusals and the encoder
CUDA-graph protocol are `drop_in.FusedEncoderDropIn`'s.

- Items: images (t = 1) and video chunks (t frames, up to the tower's `pos_emb_time`), both in the
  eager path (`embed_multimodal`) and in the encoder CUDA graphs; each yields h/2 * w/2 tokens. vLLM's
  own class sends chunks to its eager path; here they run in graphs captured per frame factor (a
  capture axis of 1, 2 and 4 for 4-frame chunks, `encoder_graph.frame_factor`).
- Weights: the inherited loader, with vLLM's name mapper minus its two projector renames
  (`mm_projector.proj.0/2` -> `linear_1/2`): our projector keeps the checkpoint's names.
- Input normalisation: supported. With `mm_device_do_normalize` (vLLM 0.34's default for this model),
  pixels arrive as raw uint8 and vLLM's tower normalises them on the device with the module
  `build_mm_input_norm` makes; the parent still builds that module and hands it to our tower stand-in,
  and we apply it to the pixels before the fused encoder, in the eager path and inside the graphs,
  whose pixel buffer is then uint8.
- Data parallelism (`mm_encoder_tp_mode="data"`): `drop_in.encode_data_parallel`, not vLLM's
  `run_dp_sharded_mrope_vision_model`, which sizes a chunk's output as t * h * w / 4 tokens.
"""

from __future__ import annotations

import dataclasses

from vllm.model_executor.models import kimi_k25 as vllm_kimi_k25

from fused_moonvit.integration.drop_in import UNSUPPORTED, FusedEncoderDropIn, encode_data_parallel
from fused_moonvit.integration.encoder_graph import PATCHES_PER_TOKEN
from fused_moonvit.moonvit.config import MoonVitConfig, moonvit3d_fields
from fused_moonvit.moonvit.fused import FusedMoonVit

_PARENT = vllm_kimi_k25.KimiK25ForConditionalGeneration

# The names the parent's __init__ builds its tower with, and the attributes it assigns the results to.
_TOWER_CONSTRUCTORS = {"MoonViT3dPretrainedModel": "vision_tower", "KimiK25MultiModalProjector": "mm_projector"}
_ENCODER_PREFIXES = tuple(f"{half}." for half in _TOWER_CONSTRUCTORS.values())

# What vLLM's MoonViT3d reads by these names, against our fields: a config where the legacy `vt_*` names
# (which we prefer) disagree with them would give a tower unlike vLLM's.
_VLLM_READS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")


def moonvit_config(hf_config) -> MoonVitConfig:
    """Our encoder's config from vLLM's (Hugging Face's) `Kimi_K25Config`."""
    vision = hf_config.vision_config
    fields = moonvit3d_fields(vision.to_dict())
    for name in _VLLM_READS:
        vllm_value = getattr(vision, name, None)
        if vllm_value is not None and vllm_value != fields[name]:
            raise ValueError(f"vision_config.{name}={vllm_value!r}, which vLLM's MoonViT3d reads, disagrees with "
                             f"{fields[name]!r} from the checkpoint's other names for it (e.g. vt_{name}); "
                             f"{UNSUPPORTED}")
    return MoonVitConfig(**fields, text_hidden_size=hf_config.text_config.hidden_size)


def _mapper_keeping_encoder_names(mapper):
    """vLLM's weight-name mapper for Kimi-K2.5 without its renames of encoder names (the projector's
    `proj.0`/`proj.2`); every other rule stays."""
    prefixes = {k: v for k, v in mapper.orig_to_new_prefix.items() if not k.startswith(_ENCODER_PREFIXES)}
    return dataclasses.replace(mapper, orig_to_new_prefix=prefixes)


class FusedKimiK25ForConditionalGeneration(FusedEncoderDropIn, _PARENT):
    """vLLM's Kimi-K2.5 / K2.6 with the fused MoonViT3d encoder as its vision tower and projector."""

    vllm_class = _PARENT
    tower_constructors = _TOWER_CONSTRUCTORS
    grid_key = "grid_thws"
    graph_modalities = ["vision_chunk"]
    video_items = True
    hf_to_vllm_mapper = _mapper_keeping_encoder_names(_PARENT.hf_to_vllm_mapper)

    @classmethod
    def moonvit_config(cls, hf_config) -> MoonVitConfig:
        return moonvit_config(hf_config)

    @classmethod
    def build_encoder(cls, config: MoonVitConfig) -> FusedMoonVit:
        return FusedMoonVit(config)  # this module's name, looked up per call (tests substitute it)

    def __init__(self, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config, prefix)
        renamed = sorted(f"{half}.{name}" for half in _TOWER_CONSTRUCTORS.values()
                         for name, _ in getattr(self.fused_encoder, half).named_parameters()
                         if self.hf_to_vllm_mapper.map_name(f"{half}.{name}") != f"{half}.{name}")
        if renamed:
            raise RuntimeError(f"this vLLM's weight-name mapper for Kimi-K2.5 renames encoder parameters "
                               f"({renamed[:3]}...), which the fused encoder keeps under the checkpoint's names; "
                               f"this vLLM release is not supported ({UNSUPPORTED})")

    # -- eager path (embed_multimodal) --

    def _process_media_input(self, media_input) -> list:
        pixel_values = media_input["pixel_values"]
        grid = [[int(v) for v in row] for row in media_input["grid_thws"].tolist()]
        if self.use_data_parallel:
            return encode_data_parallel(self.encode, pixel_values, grid, self.fused_encoder.config.output_size,
                                        self.fused_encoder.dtype)
        tokens = [h * w // PATCHES_PER_TOKEN for _, h, w in grid]
        return list(self.encode(pixel_values, grid).split(tokens))
