import numpy as np
import pytest
import torch
from kernel_cases import CASES, case_params

from fused_moonvit.kernels import (
    META_COL,
    META_HEIGHT,
    META_IMAGE,
    META_MERGE_SRC,
    META_MERGE_WIDTH,
    META_ROW,
    META_ROWS,
    META_WIDTH,
    build_plan,
    expand_plan,
    expand_plan_reference,
    new_device_plan,
    new_token_meta,
    plan_cu_seqlens,
    plan_images,
    plan_numel,
    upload_plan,
)


def test_layout_of_a_padded_plan():
    plan = build_plan(torch.tensor([[4, 6], [2, 2], [6, 2]]), budget=48, max_images=5)
    assert plan.dtype == torch.int32 and plan.shape == (plan_numel(5),)
    assert plan_cu_seqlens(plan).tolist() == [0, 24, 28, 40, 40, 40, 48]
    assert plan_images(plan).tolist() == [[0, 4, 6, 0], [24, 2, 2, 6], [28, 6, 2, 7], [40, 0, 0, 10], [40, 0, 0, 10]]
    assert plan.is_pinned() == torch.cuda.is_available()
    assert torch.equal(build_plan([[4, 6], [2, 2], [6, 2]], np.int64(48), np.int32(5)), plan)


def test_size_depends_only_on_slots():
    fitting = [c for c in CASES.values() if c.total <= 4096 and len(c.grids) <= 8]
    sizes = {build_plan(list(c.grids), 4096, 8).numel() for c in fitting}
    assert sizes == {plan_numel(8)}


@case_params
def test_every_row_in_exactly_one_sequence(case):
    cu = plan_cu_seqlens(build_plan(list(case.grids), case.budget, case.max_images)).tolist()
    assert len(cu) == case.max_images + 2 and cu[0] == 0 and cu[-1] == case.budget
    assert all(a <= b for a, b in zip(cu, cu[1:]))
    assert cu[-2] == case.total


def test_expand_meta_of_a_known_plan(device):
    plan = build_plan([(4, 6), (2, 2), (6, 2)], 48, 5)
    meta = expand_plan(upload_plan(plan, new_device_plan(5, device)), new_token_meta(48, device)).cpu()
    assert meta[META_IMAGE].tolist() == [0] * 24 + [1] * 4 + [2] * 12 + [-1] * 8
    assert meta[META_ROW, :24].tolist() == [r for r in range(4) for _ in range(6)]
    assert meta[META_COL, :24].tolist() == list(range(6)) * 4
    assert meta[META_ROW, 28:40].tolist() == [r for r in range(6) for _ in range(2)]
    assert meta[META_HEIGHT].tolist() == [4] * 24 + [2] * 4 + [6] * 12 + [0] * 8
    assert meta[META_WIDTH].tolist() == [6] * 24 + [2] * 4 + [2] * 12 + [0] * 8
    assert meta[[META_ROW, META_COL], 40:].eq(0).all()
    assert meta[META_MERGE_SRC].tolist() == [0, 2, 4, 12, 14, 16, 24, 28, 32, 36] + [-1] * 38
    assert meta[META_MERGE_WIDTH].tolist() == [6] * 6 + [2] * 4 + [0] * 38


@case_params
def test_expand_matches_reference(case, device):
    plan = build_plan(list(case.grids), case.budget, case.max_images)
    meta = new_token_meta(case.budget, device).fill_(12345)  # poison: every entry must be written
    expand_plan(upload_plan(plan, new_device_plan(case.max_images, device)), meta)
    torch.testing.assert_close(meta.cpu(), expand_plan_reference(plan, case.budget), rtol=0, atol=0)


def test_reference_against_a_per_image_loop():
    case = CASES["many"]
    plan = build_plan(list(case.grids), case.budget, case.max_images)
    meta = expand_plan_reference(plan, case.budget)
    rows, cols, srcs = [], [], []
    start = 0
    for h, w in case.grids:
        rows += [r for r in range(h) for _ in range(w)]
        cols += list(range(w)) * h
        srcs += [start + 2 * r * w + 2 * c for r in range(h // 2) for c in range(w // 2)]
        start += h * w
    assert meta[META_ROW, : case.total].tolist() == rows
    assert meta[META_COL, : case.total].tolist() == cols
    assert meta[META_MERGE_SRC, : len(srcs)].tolist() == srcs


BAD_PLANS = [
    (torch.tensor([[4.0, 4.0]]), 16, 2, TypeError, "integer dtype"),
    (torch.tensor([[True, True]]), 16, 2, TypeError, "integer dtype"),
    (torch.tensor([[4, 4, 4]]), 16, 2, ValueError, r"shape \(n, 2\)"),
    (torch.tensor([4, 4]), 16, 2, ValueError, r"shape \(n, 2\)"),
    ([(3, 4)], 16, 2, ValueError, "h must be even"),
    ([(4, 6), (4, 5)], 64, 2, ValueError, "image 1: w must be even"),
    ([(0, 4)], 16, 2, ValueError, r"h must be in 1\.\.512 patches, got 0"),
    ([(4, 514)], 4096, 2, ValueError, r"w must be in 1\.\.512 patches, got 514"),
    ([(-2, 4)], 16, 2, ValueError, r"got -2"),
    ([(4, 4), (4, 4)], 28, 2, ValueError, "32 patches in total, more than the budget 28"),
    ([(2, 2)] * 3, 16, 2, ValueError, "3 images but max_images is 2"),
    ([(2, 2)], 18, 2, ValueError, "budget must be a multiple of 4"),
    ([(2, 2)], 16.0, 2, TypeError, "budget must be an int"),
    ([(2, 2)], 16, 0, ValueError, "max_images must be >= 1"),
]


@pytest.mark.parametrize("grids, budget, slots, exc, match", BAD_PLANS)
def test_build_plan_rejects(grids, budget, slots, exc, match):
    with pytest.raises(exc, match=match):
        build_plan(grids, budget, slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_build_plan_rejects_device_grids():
    with pytest.raises(ValueError, match="grid_hws must be a CPU tensor"):
        build_plan(torch.tensor([[2, 2]], device="cuda"), 16, 2)


def test_upload_and_expand_reject_bad_buffers(device):
    plan = build_plan([(2, 2)], 16, 2)
    with pytest.raises(ValueError, match=r"device_plan must have shape \(12,\)"):
        upload_plan(plan, new_device_plan(3, device))
    with pytest.raises(TypeError, match="device_plan must have dtype"):
        upload_plan(plan, torch.zeros(plan.numel(), dtype=torch.int64, device=device))
    device_plan = upload_plan(plan, new_device_plan(2, device))
    with pytest.raises(ValueError, match=r"token_meta must have shape \(7, \*\)"):
        expand_plan(device_plan, torch.zeros(3, 16, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="token_meta's column count B must be a multiple of 4 patches .the 2x2 merge., got 18"):
        expand_plan(device_plan, torch.zeros(META_ROWS, 18, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="plan must have 5 \\* S \\+ 2 entries"):
        expand_plan(device_plan[:10], new_token_meta(16, device))
