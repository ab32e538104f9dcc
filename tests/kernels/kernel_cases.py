"""Image sets and helpers shared by the kernel tests."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from fused_moonvit.kernels import build_plan, expand_plan, new_device_plan, new_token_meta, upload_plan


@dataclass(frozen=True)
class Case:
    grids: tuple[tuple[int, int], ...]
    budget: int
    max_images: int

    @property
    def total(self) -> int:
        return sum(h * w for h, w in self.grids)


def make_case(grids, extra=0, slots=None) -> Case:
    grids = tuple(grids)
    return Case(grids, sum(h * w for h, w in grids) + extra, slots or max(1, len(grids)))


CASES = {
    "one": make_case([(6, 10)]),
    "many": make_case([(2, 4), (8, 6), (4, 4), (10, 2), (6, 12), (2, 2)], slots=8),
    "2xN": make_case([(2, 40), (2, 6)]),
    "Nx2": make_case([(40, 2), (6, 2)]),
    "identity64": make_case([(64, 64)]),
    "side512_h": make_case([(512, 2)]),
    "side512_w": make_case([(2, 512)]),
    "padding": make_case([(4, 6), (2, 2), (6, 2)], extra=24, slots=5),
    "max_slots": make_case([(2, 2), (4, 2), (2, 4), (6, 6), (2, 8), (8, 2), (2, 2), (10, 4)], extra=4),
    "all_padding": Case((), 16, 2),
}

# Real sizes (1152 channels, 16 x 72 heads, 20k tokens) run only on a GPU: interpreted, they would take
# minutes.
REAL_SIZE = make_case([(32, 32)] * 12 + [(64, 64), (24, 40), (40, 24), (28, 36)], extra=1000, slots=20)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

case_params = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
dtype_params = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])

# fp32 relative errors (||a - b|| / ||b||) allowed; bf16 results may differ by one rounding in a few elements.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from the running test's id and `key`: reproducible, and different for
    every test and parametrisation."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    return torch.Generator().manual_seed(zlib.crc32(repr((test, key)).encode()))


def randn(shape, gen, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


def token_meta_for(case: Case, device: torch.device) -> torch.Tensor:
    plan = build_plan(list(case.grids), case.budget, case.max_images)
    device_plan = upload_plan(plan, new_device_plan(case.max_images, device))
    return expand_plan(device_plan, new_token_meta(case.budget, device))


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())
