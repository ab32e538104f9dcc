"""Limits that every layer checks against, defined once.

This module imports no Triton, so the eager reference path can use it without deciding between the
Triton interpreter and the GPU compiler (`fused_moonvit.kernels` imports its kernel modules lazily).
"""

from __future__ import annotations

import operator

MAX_GRID_SIDE = 512  # patches per image side: the processor's limit and the RoPE table's extent
MERGE_SIDE = 2  # the merge takes MERGE_SIDE x MERGE_SIDE patches into one output token
MERGE_PATCHES = MERGE_SIDE * MERGE_SIDE  # patch rows per merged output token
_INT32_MAX = 2**31 - 1


def check_int(name: str, value: object, minimum: int) -> int:
    """`value` as an int (Python or NumPy integers, not floats or bools) >= minimum, or a clear error."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_budget(budget: object, name: str = "budget") -> int:
    """A patch budget B: a positive multiple of 4, so that B / 4 merged rows exist, that fits in int32."""
    budget = check_int(name, budget, MERGE_PATCHES)
    if budget % MERGE_PATCHES:
        raise ValueError(f"{name} must be a multiple of {MERGE_PATCHES} patches (the 2x2 merge), got {budget}")
    if budget > _INT32_MAX:
        raise ValueError(f"{name} must fit in int32, got {budget}")
    return budget
