"""The `vllm.general_plugins` entry point: serves each model family's vLLM architectures (Kimi-VL,
Kimi-K2.5 / K2.6, Kimi-K3 / K3.1; `moonvit/families.py`) with the fused MoonVit encoder.

vLLM runs every general plugin in each process it starts (API server, engine core, workers, and the
subprocess that inspects model classes), so `register` is cheap and idempotent: it reads the family
declarations (no Triton, no vLLM model module), and a drop-in's module is imported only when vLLM
resolves its architecture. An architecture the installed vLLM does not know (Kimi-K3 before 0.34) is
left alone. vLLM's own `VLLM_PLUGINS` allow-list (entry-point name `fused_moonvit`) decides whether
`register` runs at all; `FUSED_MOONVIT_DISABLE=1` keeps it loaded but leaves vLLM's classes in place.
"""

from __future__ import annotations

import os

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from vllm.logger import init_logger

    from fused_moonvit.moonvit.families import DISABLE_ENV, vllm_architectures

    # Under vLLM's logger hierarchy, so the line appears in vLLM's own log output.
    logger = init_logger("vllm.fused_moonvit")
    architectures = vllm_architectures()
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        logger.info("fused-moonvit: %s is set; %s keep vLLM's own MoonVit encoder", DISABLE_ENV,
                    " and ".join(architectures))
        return

    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    swapped = [arch for arch in architectures if arch in known]
    if not swapped:
        logger.warning("fused-moonvit: this vLLM knows none of %s; nothing to swap", " and ".join(architectures))
        return
    for arch in swapped:
        ModelRegistry.register_model(arch, architectures[arch].vllm.drop_in)
    logger.info("fused-moonvit: %s use%s the fused MoonVit encoder (set %s=1 to turn it off)",
                " and ".join(swapped), "s" if len(swapped) == 1 else "", DISABLE_ENV)
