"""The `vllm.general_plugins` entry point: serves Kimi-VL and Kimi-K2.5 / K2.6 with the fused MoonVit
encoder.

vLLM runs every general plugin in each process it starts (API server, engine core, workers, and the
subprocess that inspects model classes), so `register` is cheap and idempotent: it imports nothing of
ours, and a model module is imported only when vLLM resolves its architecture. An architecture the
installed vLLM does not know is left alone. vLLM's own `VLLM_PLUGINS` allow-list (entry-point name
`fused_moonvit`) decides whether `register` runs at all; `FUSED_MOONVIT_DISABLE=1` keeps it loaded but
leaves vLLM's classes in place.
"""

from __future__ import annotations

import os

# vLLM's architecture name -> our class, as the lazy "module:Class" string vLLM's registry takes.
MODEL_CLASSES = {
    "KimiVLForConditionalGeneration": "fused_moonvit.integration.kimi_vl:FusedKimiVLForConditionalGeneration",
    "KimiK25ForConditionalGeneration": "fused_moonvit.integration.kimi_k25:FusedKimiK25ForConditionalGeneration",
}
ARCHITECTURE = "KimiVLForConditionalGeneration"
MODEL_CLASS = MODEL_CLASSES[ARCHITECTURE]
DISABLE_ENV = "FUSED_MOONVIT_DISABLE"

_registered = False


def swap_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from vllm.logger import init_logger

    # Under vLLM's logger hierarchy, so the line appears in vLLM's own log output.
    logger = init_logger("vllm.fused_moonvit")
    if swap_disabled():
        logger.info("fused-moonvit: %s is set; %s keep vLLM's own MoonVit encoder", DISABLE_ENV,
                    " and ".join(MODEL_CLASSES))
        return

    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    swapped = [arch for arch in MODEL_CLASSES if arch in known]
    if not swapped:
        logger.warning("fused-moonvit: this vLLM knows none of %s; nothing to swap", " and ".join(MODEL_CLASSES))
        return
    for arch in swapped:
        ModelRegistry.register_model(arch, MODEL_CLASSES[arch])
    logger.info("fused-moonvit: %s use%s the fused MoonVit encoder (set %s=1 to turn it off)",
                " and ".join(swapped), "s" if len(swapped) == 1 else "", DISABLE_ENV)
