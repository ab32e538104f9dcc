"""`FusedKimiK3ForConditionalGeneration`: vLLM 0.34's Kimi-K3 model (registered as
`KimiK3ForConditionalGeneration` and `KimiK31ForConditionalGeneration`) with the fused MoonViT3d encoder.

vLLM's class (in `vllm.models.kimi_k3`, which picks its NVIDIA or AMD implementation at import) builds
the same `MoonViT3dPretrainedModel` + `KimiK25MultiModalProjector` as Kimi-K2.5, with K3's options:
12 heads of 128 (a qkv of 1536), RMSNorm, no biases, a bilinear position table and the `patchmergerv2`
projector. Everything of ours is `drop_in.FusedEncoderDropIn`'s, from `families.KIMI_K3`, as for K2.5
(weights under the checkpoint's `mm_projector.proj.*` names, raw-pixel normalisation, data parallelism,
the encoder CUDA graphs with their frame-factor axis). vLLM 0.34's K3 processor sends images only; its
tower, and ours, also take video chunks.

What the parent's `__init__` reads of its tower, `vision_tower.encoder.blocks[0].attn` (whether to warm
up vLLM's FlashAttention-4 kernels for it), is answered by `drop_in.EncoderAttentionFacts`.
"""

from __future__ import annotations

from fused_moonvit.integration.drop_in import FusedEncoderDropIn, vllm_class
from fused_moonvit.moonvit.families import KIMI_K3


class FusedKimiK3ForConditionalGeneration(FusedEncoderDropIn, vllm_class(KIMI_K3)):
    """vLLM's Kimi-K3 / K3.1 with the fused MoonViT3d encoder as its vision tower and projector."""

    family = KIMI_K3
