"""`FusedKimiK25ForConditionalGeneration`: vLLM's Kimi-K2.5 / K2.6 model with the fused MoonViT3d encoder.

A subclass of vLLM's `KimiK25ForConditionalGeneration` (vLLM 0.33.0 and 0.34.0 ship the same one), so
the processor, the language model, the weight loader and everything else about serving stay vLLM's. The
vision tower and projector are one `FusedMoonVit` of a MoonViT3d config, whose two halves sit at
`vision_tower` and `mm_projector` under the checkpoint's names; the rest is `drop_in.FusedEncoderDropIn`'s,
from the family's declaration (`families.KIMI_K25`):

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

from fused_moonvit.integration.drop_in import FusedEncoderDropIn, vllm_class
from fused_moonvit.moonvit.families import KIMI_K25


class FusedKimiK25ForConditionalGeneration(FusedEncoderDropIn, vllm_class(KIMI_K25)):
    """vLLM's Kimi-K2.5 / K2.6 with the fused MoonViT3d encoder as its vision tower and projector."""

    family = KIMI_K25
