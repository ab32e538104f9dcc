"""The parts of Triton's Gluon dialect the Hopper attention uses, imported in one place.

Gluon (`triton.experimental.gluon`) is experimental and its names move between releases: Triton 3.6
(the GPU machine's) names the TMA load `tma.async_copy_global_to_shared` and the CTA barrier
`gl.thread_barrier`; 3.8 (what vLLM 0.33 / 0.34 install, with torch 2.14) adds `tma.async_load`, keeping
the old name as an alias, and renames the barrier `gl.barrier`; later releases drop the alias. Everything
version-dependent is decided here, so the kernel module has no version checks.

`GLUON_MISSING` is None where everything imported, else why not (said, never raised, so the attention
choice can skip the backend with its reason).
"""

from __future__ import annotations

GLUON_MISSING: str | None = None

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError as exc:  # a Triton without Gluon, or with another layout of it
    GLUON_MISSING = f"this Triton has no usable Gluon (triton.experimental.gluon): {exc}"
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None
    TensorDescriptor = tma_load = cta_barrier = None
else:
    tma_load = getattr(tma, "async_load", None) or getattr(tma, "async_copy_global_to_shared", None)
    cta_barrier = getattr(gl, "barrier", None) or getattr(gl, "thread_barrier", None)
    if tma_load is None or cta_barrier is None:
        GLUON_MISSING = ("this Triton's Gluon lacks the TMA load (tma.async_load / async_copy_global_to_shared) or "
                         "the CTA barrier (gl.barrier / thread_barrier)")

__all__ = ["GLUON_MISSING", "TensorDescriptor", "cta_barrier", "fence_async_shared", "gl", "gluon", "mbarrier", "tma_load",
           "warpgroup_mma", "warpgroup_mma_wait"]
