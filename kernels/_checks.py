"""Argument checks shared by the kernel launchers.

Launchers run inside a CUDA-graph-captured forward, so every check here reads tensor metadata
(shape, dtype, device, strides) only and never the data: no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Raise TypeError or ValueError naming `name` and the offending value; return `t`.

    `shape` entries that are None match any size.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = str(dtypes[0]) if len(dtypes) == 1 else "in (" + ", ".join(str(d) for d in dtypes) + ")"
        raise TypeError(f"{name} must have dtype {allowed}, got {t.dtype}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
        if not ok:
            dims = ["*" if s is None else str(s) for s in shape]
            want = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t


def check_launchable(kernel: object, device: torch.device) -> bool:
    """Return True when `kernel` runs under the Triton interpreter; raise if it cannot run on `device`.

    Triton picks the interpreter when a kernel is decorated, so TRITON_INTERPRET=1 must be set before
    this package is imported for CPU tensors to work.
    """
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "got CPU tensors but the Triton kernels were compiled for a GPU; set TRITON_INTERPRET=1 "
            "before importing fused_moonvit.kernels to run them on the CPU"
        )
    return interpreted


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
