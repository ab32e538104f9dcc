"""Launch settings (block sizes, warps, rows per program) as tables, one per kernel, and their lookup.

A table is a list of rows; each row is a dict of keys and settings. The keys say where a row applies:
`device_class` (see `device_class`; "cpu" is the Triton interpreter's row), and any shape the launcher
passes by name, matched either exactly (`head_dim: 72`) or as a bound (`max_budget: 2048` holds budgets up
to 2048). A row that does not name a key matches any value of it. The first matching row wins; where rows
match a shape's exact keys but none of their bounds holds it, the last of them does (bounds are what was
measured; a larger shape takes the largest measured row). Everything else in a row is a setting the
launcher reads by name.

Each kernel module keeps its table beside its launcher (docs/design.md section 14.1). The measured
attention table of moonvit/attention.py (attention_table.json) has rows of the same form and is read with
`select_row`.

A GPU whose class no row names (sm80, sm100, ...) gets the sm90 rows: they were measured on H100 and H200,
and every GPU ran them before the tables existed.

This module imports no Triton, so importing it does not decide between the interpreter and the compiler.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ._checks import check_launchable

INTERPRETER = "cpu"
FALLBACK_GPU_CLASS = "sm90"


def device_class(device: torch.device | str) -> str:
    """What decides a launch: "sm90" for a Hopper GPU (compute capability 9.0), "cpu" for the interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_class(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_class(index: int) -> str:
    # Read once per GPU: every eager kernel launch looks its class up.
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def _holds(row: dict, name: str, value: object) -> bool:
    if name in row:
        return row[name] == value
    bound = row.get(f"max_{name}")
    return bound is None or value <= bound


def select_row(rows: Sequence[dict], **keys) -> dict | None:
    """The row of `rows` for `keys` (see the module docstring), or None where no row matches the exact keys."""
    exact = [r for r in rows if all(r[k] == v for k, v in keys.items() if k in r)]
    return next((r for r in exact if all(_holds(r, k, v) for k, v in keys.items())), exact[-1] if exact else None)


def launch_settings(table: Sequence[dict], kernel: object, device: torch.device, **keys) -> dict:
    """The row of a kernel's launch table for a launch of `kernel` on `device` with shape `keys`: the
    interpreter's row where `kernel` runs interpreted (raising where it cannot run on `device`), else the
    device class's, else the sm90 row."""
    if check_launchable(kernel, device):
        cls = INTERPRETER
    else:
        cls = device_class(device)
        if not any(r["device_class"] == cls for r in table):
            cls = FALLBACK_GPU_CLASS
    row = select_row(table, device_class=cls, **keys)
    if row is None:
        raise LookupError(f"no launch settings for {cls} and {keys}: the table has no row for them")
    return row
