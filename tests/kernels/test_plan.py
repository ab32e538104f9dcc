import random

import numpy as np
import pytest
import torch
from kernel_cases import CASES, case_params

from fused_moonvit.kernels import (
    META_COL,
    META_HEIGHT,
    META_ITEM,
    META_MERGE_FRAMES,
    META_MERGE_SRC,
    META_MERGE_STRIDE,
    META_MERGE_WIDTH,
    META_ROW,
    META_ROWS,
    META_TIME,
    META_WIDTH,
    build_plan,
    expand_plan,
    expand_plan_reference,
    new_device_plan,
    new_token_meta,
    plan_cu_outputs,
    plan_cu_seqlens,
    plan_items,
    plan_numel,
    upload_plan,
)


def test_layout_of_a_padded_plan():
    plan = build_plan(torch.tensor([[4, 6], [2, 2], [6, 2]]), budget=48, max_items=5)
    assert plan.dtype == torch.int32 and plan.shape == (plan_numel(5),)
    assert plan_cu_seqlens(plan).tolist() == [0, 24, 28, 40, 40, 40, 48]
    assert plan_cu_outputs(plan).tolist() == [0, 6, 7, 10, 10, 10]
    assert plan_items(plan).tolist() == [[0, 1, 4, 6], [24, 1, 2, 2], [28, 1, 6, 2], [40, 0, 0, 0], [40, 0, 0, 0]]
    assert plan.is_pinned() == torch.cuda.is_available()
    assert torch.equal(build_plan([[4, 6], [2, 2], [6, 2]], np.int64(48), np.int32(5)), plan)


@pytest.mark.parametrize("slots", [1, 3, 16, 64, 257])
def test_plan_matches_the_documented_layout(slots):
    """Every entry against the module docstring's layout, written out entry by entry, for random images and
    video chunks from none up to every slot filled."""
    rng = random.Random(slots)
    for n in sorted({0, 1, slots // 2, slots}):
        items = [(rng.randint(1, 4), 2 * rng.randint(1, 8), 2 * rng.randint(1, 8)) for _ in range(n)]
        total = sum(t * h * w for t, h, w in items)
        budget = max(4, total + 4 * rng.randint(0, 20))
        starts, outputs = [0], [0]
        for t, h, w in items:
            starts.append(starts[-1] + t * h * w)
            outputs.append(outputs[-1] + h * w // 4)
        want = starts + [total] * (slots - n) + [budget]
        want += outputs + [outputs[-1]] * (slots - n)
        for i in range(slots):
            want += [starts[i], *items[i]] if i < n else [total, 0, 0, 0]
        plan = build_plan(items, budget, slots)
        assert plan.dtype == torch.int32 and plan.tolist() == want, (n, items)


def test_size_depends_only_on_slots():
    fitting = [c for c in CASES.values() if c.total <= 4096 and len(c.grids) <= 8]
    sizes = {build_plan(list(c.grids), 4096, 8).numel() for c in fitting}
    assert sizes == {plan_numel(8)}


@case_params
def test_every_row_in_exactly_one_sequence(case):
    cu = plan_cu_seqlens(build_plan(list(case.grids), case.budget, case.max_items)).tolist()
    assert len(cu) == case.max_items + 2 and cu[0] == 0 and cu[-1] == case.budget
    assert all(a <= b for a, b in zip(cu, cu[1:]))
    assert cu[-2] == case.total


def test_expand_meta_of_a_known_plan(device):
    plan = build_plan([(4, 6), (2, 2), (6, 2)], 48, 5)
    meta = expand_plan(upload_plan(plan, new_device_plan(5, device)), new_token_meta(48, device)).cpu()
    assert meta[META_ITEM].tolist() == [0] * 24 + [1] * 4 + [2] * 12 + [-1] * 8
    assert meta[META_ROW, :24].tolist() == [r for r in range(4) for _ in range(6)]
    assert meta[META_COL, :24].tolist() == list(range(6)) * 4
    assert meta[META_ROW, 28:40].tolist() == [r for r in range(6) for _ in range(2)]
    assert meta[META_HEIGHT].tolist() == [4] * 24 + [2] * 4 + [6] * 12 + [0] * 8
    assert meta[META_WIDTH].tolist() == [6] * 24 + [2] * 4 + [2] * 12 + [0] * 8
    assert meta[[META_ROW, META_COL], 40:].eq(0).all()
    assert meta[META_MERGE_SRC].tolist() == [0, 2, 4, 12, 14, 16, 24, 28, 32, 36] + [-1] * 38
    assert meta[META_MERGE_WIDTH].tolist() == [6] * 6 + [2] * 4 + [0] * 38
    assert meta[META_TIME].eq(0).all(), "images add no time embedding"
    assert meta[META_MERGE_FRAMES].tolist() == [1] * 10 + [0] * 38
    assert meta[META_MERGE_STRIDE].tolist() == [24] * 6 + [4] + [12] * 3 + [0] * 38


def test_expand_meta_of_video_chunks(device):
    # A 3-frame 2x4 chunk, an image, a 2-frame 4x2 chunk, 12 padding rows.
    plan = build_plan([(3, 2, 4), (1, 2, 2), (2, 4, 2)], 56, 4)
    assert plan_cu_seqlens(plan).tolist() == [0, 24, 28, 44, 44, 56]
    assert plan_cu_outputs(plan).tolist() == [0, 2, 3, 5, 5]
    meta = new_token_meta(56, device).fill_(-9)
    meta = expand_plan(upload_plan(plan, new_device_plan(4, device)), meta).cpu()
    assert meta[META_ITEM].tolist() == [0] * 24 + [1] * 4 + [2] * 16 + [-1] * 12
    # Frame f of a chunk adds time row f (stored f + 1); the image and the padding add none (0).
    assert meta[META_TIME].tolist() == [f + 1 for f in range(3) for _ in range(8)] + [0] * 4 + [1] * 8 + [2] * 8 + [0] * 12
    assert meta[META_ROW, :24].tolist() == [r for r in range(2) for _ in range(4)] * 3
    assert meta[META_COL, 28:44].tolist() == [0, 1] * 8
    assert meta[META_ROW, 28:44].tolist() == [r for r in range(4) for _ in range(2)] * 2
    assert meta[META_MERGE_SRC].tolist() == [0, 2, 24, 28, 32] + [-1] * 51
    assert meta[META_MERGE_WIDTH].tolist() == [4, 4, 2, 2, 2] + [0] * 51
    assert meta[META_MERGE_FRAMES].tolist() == [3, 3, 1, 2, 2] + [0] * 51
    assert meta[META_MERGE_STRIDE].tolist() == [8, 8, 4, 8, 8] + [0] * 51
    torch.testing.assert_close(meta, expand_plan_reference(plan, 56), rtol=0, atol=0)


@case_params
def test_expand_matches_reference(case, device):
    plan = build_plan(list(case.grids), case.budget, case.max_items)
    meta = new_token_meta(case.budget, device).fill_(12345)  # poison: every entry must be written
    expand_plan(upload_plan(plan, new_device_plan(case.max_items, device)), meta)
    torch.testing.assert_close(meta.cpu(), expand_plan_reference(plan, case.budget), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["many", "video_mix"])
def test_reference_against_a_per_image_loop(name):
    case = CASES[name]
    plan = build_plan(list(case.grids), case.budget, case.max_items)
    meta = expand_plan_reference(plan, case.budget)
    rows, cols, times, srcs = [], [], [], []
    start = 0
    for t, h, w in case.items:
        rows += [r for r in range(h) for _ in range(w)] * t
        cols += list(range(w)) * h * t
        times += [f + 1 if t > 1 else 0 for f in range(t) for _ in range(h * w)]
        srcs += [start + 2 * r * w + 2 * c for r in range(h // 2) for c in range(w // 2)]
        start += t * h * w
    assert meta[META_ROW, : case.total].tolist() == rows
    assert meta[META_COL, : case.total].tolist() == cols
    assert meta[META_TIME, : case.total].tolist() == times
    assert meta[META_MERGE_SRC, : len(srcs)].tolist() == srcs


BAD_PLANS = [
    (torch.tensor([[4.0, 4.0]]), 16, 2, TypeError, "integer dtype"),
    (torch.tensor([[True, True]]), 16, 2, TypeError, "integer dtype"),
    (torch.tensor([[4, 4, 4, 4]]), 64, 2, ValueError, r"shape \(n, 2\) of \(h, w\) or \(n, 3\) of \(t, h, w\), got \(1, 4\)"),
    (torch.tensor([4, 4]), 16, 2, ValueError, r"shape \(n, 2\)"),
    ([(0, 2, 2)], 16, 2, ValueError, "item 0: t must be at least 1 frame, got 0"),
    ([(2, 4, 3)], 64, 2, ValueError, "item 0: w must be even"),
    ([(3, 4, 4)], 44, 2, ValueError, "48 patches in total, more than the budget 44"),
    ([(3, 4)], 16, 2, ValueError, "h must be even"),
    ([(4, 6), (4, 5)], 64, 2, ValueError, "item 1: w must be even"),
    ([(0, 4)], 16, 2, ValueError, r"h must be in 1\.\.512 patches, got 0"),
    ([(4, 514)], 4096, 2, ValueError, r"w must be in 1\.\.512 patches, got 514"),
    ([(-2, 4)], 16, 2, ValueError, r"got -2"),
    ([(4, 4), (4, 4)], 28, 2, ValueError, "32 patches in total, more than the budget 28"),
    ([(2, 2)] * 3, 16, 2, ValueError, "3 items but max_items is 2"),
    ([(2, 2)], 18, 2, ValueError, "budget must be a multiple of 4"),
    ([(2, 2)], 16.0, 2, TypeError, "budget must be an int"),
    ([(2, 2)], 16, 0, ValueError, "max_items must be >= 1"),
]


@pytest.mark.parametrize("grids, budget, slots, exc, match", BAD_PLANS)
def test_build_plan_rejects(grids, budget, slots, exc, match):
    with pytest.raises(exc, match=match):
        build_plan(grids, budget, slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_build_plan_rejects_device_grids():
    with pytest.raises(ValueError, match="the grid must be a CPU tensor"):
        build_plan(torch.tensor([[2, 2]], device="cuda"), 16, 2)


def test_upload_and_expand_reject_bad_buffers(device):
    plan = build_plan([(2, 2)], 16, 2)
    with pytest.raises(ValueError, match=r"device_plan must have shape \(15,\)"):
        upload_plan(plan, new_device_plan(3, device))
    with pytest.raises(TypeError, match="device_plan must have dtype"):
        upload_plan(plan, torch.zeros(plan.numel(), dtype=torch.int64, device=device))
    device_plan = upload_plan(plan, new_device_plan(2, device))
    with pytest.raises(ValueError, match=r"token_meta must have shape \(10, \*\)"):
        expand_plan(device_plan, torch.zeros(3, 16, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="token_meta's column count B must be a multiple of 4 patches .the 2x2 merge., got 18"):
        expand_plan(device_plan, torch.zeros(META_ROWS, 18, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="plan must have 6 \\* S \\+ 3 entries"):
        expand_plan(device_plan[:10], new_token_meta(16, device))
