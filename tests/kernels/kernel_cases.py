"""Image sets and helpers shared by the kernel tests."""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from fused_moonvit.kernels import build_plan, expand_plan, new_device_plan, new_token_meta, upload_plan


@dataclass(frozen=True)
class Case:
    grids: tuple[tuple[int, ...], ...]  # (h, w) of images, or (t, h, w) of items
    budget: int
    max_items: int

    @property
    def items(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(g if len(g) == 3 else (1, *g) for g in self.grids)

    @property
    def total(self) -> int:
        return sum(t * h * w for t, h, w in self.items)

    @property
    def outputs(self) -> int:
        """Merged tokens: h/2 * w/2 per item, whatever its frames."""
        return sum(h * w // 4 for _, h, w in self.items)


def make_case(grids, extra=0, slots=None) -> Case:
    grids = tuple(tuple(g) for g in grids)
    return Case(grids, sum(math.prod(g) for g in grids) + extra, slots or max(1, len(grids)))


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
    # Video chunks (t, h, w) between images: frames share rows and columns, and merge as one.
    "video_mix": make_case([(1, 4, 6), (3, 2, 4), (1, 2, 2), (4, 6, 2), (2, 8, 10)], extra=12, slots=6),
}

# Real sizes (1152 channels, 16 x 72 heads) run only on a GPU: interpreted, they would take minutes. The
# large case takes the launchers' paths for many tokens (the position embedding loops over channel blocks
# inside a program from 4224 tokens on); the small one spreads channel blocks over programs instead.
REAL_SIZE = make_case([(32, 32)] * 12 + [(64, 64), (24, 40), (40, 24), (28, 36)], extra=1000, slots=20)
REAL_SMALL = make_case([(32, 32), (16, 16), (2, 2)], extra=100, slots=4)
real_case_params = pytest.mark.parametrize("real_case", [REAL_SIZE, REAL_SMALL], ids=["20k_tokens", "1.4k_tokens"])
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
    plan = build_plan(list(case.grids), case.budget, case.max_items)
    device_plan = upload_plan(plan, new_device_plan(case.max_items, device))
    return expand_plan(device_plan, new_token_meta(case.budget, device))


def assert_elementwise_close(out: torch.Tensor, exact: torch.Tensor) -> None:
    """Every element of `out` within one unit in the last place of out's dtype at the exact value's
    magnitude, plus fp32 noise relative to the largest value (for sums that cancel to near zero).

    `exact` is the reference computed without rounding to out's dtype (in fp32 from upcast inputs). A
    norm-relative bound lets a few completely wrong elements through at millions of elements, which is
    what an indexing or masking bug looks like; this does not. NaN anywhere fails.
    """
    got, want = out.double().cpu(), exact.double().cpu()
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    mag = want.abs().clamp(min=torch.finfo(torch.float32).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * torch.finfo(out.dtype).eps
    bound = ulp + 2.0**-20 * want.abs().max()
    err = (got - want).abs()
    bad = ~(err <= bound)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {got.numel()} elements are off, e.g. at {first}: "
                             f"got {got[first].item()!r}, want {want[first].item()!r} (bound {bound[first].item():.3g})")


def assert_nonfinite_as_reference(out: torch.Tensor, exact: torch.Tensor) -> None:
    """NaN and Inf in valid rows come out where the exact reference has them (NaN where it has NaN), and
    every other element is as close as `assert_elementwise_close` demands: a kernel must never turn a
    NaN or Inf into a finite number, nor make one up."""
    got, want = out.cpu(), exact.cpu()
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (
        f"non-finite elements at {(~torch.isfinite(got)).nonzero().tolist()[:8]}, "
        f"the reference has them at {(~torch.isfinite(want)).nonzero().tolist()[:8]}")
    assert got[want.isnan()].isnan().all(), "a NaN of the reference came out as a number"
    finite = torch.isfinite(want)
    assert_elementwise_close(torch.where(finite, got, 0), torch.where(finite, want, 0))


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def check_attention_output(out, qkv, cu, heads, head_dim):
    """Attention output `out` of the packed qkv against fp64 SDPA per sequence: valid rows all written and
    close (norm-relative and per element), the padding sequence's rows zeros."""
    from fused_moonvit.kernels.attention import varlen_attention_reference

    bounds = cu.tolist()
    valid = bounds[-2]
    assert torch.isfinite(out[:valid]).all(), "a valid element was not written"
    assert out[valid:].eq(0).all(), "padding rows must be zeros"
    exact = varlen_attention_reference(qkv.float(), cu, heads, head_dim)
    if valid == 0:
        return
    assert relerr(out[:valid], exact[:valid]) <= (1e-5 if qkv.dtype == torch.float32 else 1e-2)
    # Every element: an output row averages its head's v rows, so its error scales with the largest |v|
    # there: P rounded to bf16 before the second product (as FlashAttention does) gives 2^-9 of it; in fp32,
    # exp2 and fp32 sums over thousands of keys stay under 2^-14 of it. Plus the output's own rounding. A wrong
    # row or column (an indexing or masking bug) is off by far more.
    scale = 2.0**-8 if qkv.dtype != torch.float32 else 2.0**-14
    vmax = qkv[:valid, 2 * heads * head_dim:].float().abs().view(valid, heads, head_dim).amax(dim=(0, 2))
    err = (out.float() - exact).abs().view(-1, heads, head_dim)
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30)))).view(-1, heads, head_dim)
    bound = scale * vmax[None, :, None] + ulp * torch.finfo(qkv.dtype).eps
    assert (err <= bound).all(), f"{int((err > bound).sum())} elements off, worst {float((err - bound).max()):.3g}"
