"""The `vllm.general_plugins` entry point: serves Kimi-VL with the fused MoonVit encoder.

vLLM runs every general plugin in each process it starts (API server, engine core, workers, and the
subprocess that inspects model classes), so `register` is cheap and idempotent: it imports nothing of
ours, and the model module is imported only when vLLM resolves the architecture. vLLM's own
`VLLM_PLUGINS` allow-list (entry-point name `fused_moonvit`) decides whether `register` runs at all;
`FUSED_MOONVIT_DISABLE=1` keeps it loaded but leaves vLLM's class in place.
"""

from __future__ import annotations

import os

ARCHITECTURE = "KimiVLForConditionalGeneration"
MODEL_CLASS = "fused_moonvit.integration.kimi_vl:FusedKimiVLForConditionalGeneration"
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
        logger.info("fused-moonvit: %s is set; %s keeps vLLM's own MoonVit encoder", DISABLE_ENV, ARCHITECTURE)
        return

    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    logger.info("fused-moonvit: %s uses the fused MoonVit encoder (set %s=1 to turn it off)",
                ARCHITECTURE, DISABLE_ENV)
