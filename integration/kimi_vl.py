"""`FusedKimiVLForConditionalGeneration`: vLLM's Kimi-VL model with the fused MoonVit encoder.

A subclass of vLLM's `KimiVLForConditionalGeneration`, so the processor registration, the language model,
the weight loader and everything else about serving stay vLLM's. Only the vision tower and projector are
ours: one `FusedMoonVit`, whose two halves sit at `vision_tower` and `multi_modal_projector` with the
checkpoint's parameter names, so vLLM's `AutoWeightsLoader` fills them like any plain module.

Everything else (construction, refusals, the weight check, the eager path and its data parallelism, the
encoder CUDA-graph protocol) is `drop_in.FusedEncoderDropIn`'s, from the family's declaration
(`families.KIMI_VL`). Tested on vLLM 0.33.0 and 0.34.0.
"""

from __future__ import annotations

from fused_moonvit.integration.drop_in import FusedEncoderDropIn, vllm_class
from fused_moonvit.moonvit.families import KIMI_VL


class FusedKimiVLForConditionalGeneration(FusedEncoderDropIn, vllm_class(KIMI_VL)):
    """vLLM's Kimi-VL with the fused MoonVit encoder as its vision tower and projector."""

    family = KIMI_VL
