"""`Items`: the one validated form of a call's items, and `build_plan` trusting it."""

import pytest
import torch

import fused_moonvit.kernels.items as items_module
from fused_moonvit.kernels.items import Items
from fused_moonvit.kernels.plan import build_plan
from fused_moonvit.moonvit.inputs import check_inputs


@pytest.mark.parametrize("grid, max_frames, error, match", [
    ([(0, 2, 2)], None, ValueError, r"item 0: t must be at least 1 frame, got 0"),
    ([(1, 2, 2), (-1, 2, 2)], 4, ValueError, r"item 1: t must be at least 1 frame, got -1"),
    ([(2, 4), (3, 4)], None, ValueError, r"item 1: h must be even, got 3: not a multiple of the merge size 2"),
    ([(2, 4, 5)], 4, ValueError, r"item 0: w must be even, got 5: .*\(grid 2x4x5\)"),
    ([(4, 514)], None, ValueError, r"item 0: w must be in 1\.\.512 patches, got 514"),
    ([(2, 0, 4)], 4, ValueError, r"item 0: h must be in 1\.\.512 patches, got 0"),
    ([(1, 2, 2), (5, 2, 2)], 4, ValueError, r"item 1 \(5x2x2\) has 5 frames, but the tower's time embedding has 4"),
    ([(2, 2, 2)], 1, ValueError, r"item 0 \(2x2x2\) has 2 frames, but this tower takes images only"),
    (torch.tensor([[4.0, 4.0]]), None, TypeError, r"must hold integers \(an integer dtype\), got dtype torch.float32"),
    (torch.tensor([[True, True]]), None, TypeError, r"got dtype torch.bool"),
    (torch.tensor([[4, 4, 4, 4]]), None, ValueError, r"shape \(n, 2\) of \(h, w\) or \(n, 3\) of \(t, h, w\), got \(1, 4\)"),
    (torch.tensor([4, 4]), None, ValueError, r"got \(2,\)"),
])
def test_items_reject_bad_grids_naming_the_value(grid, max_frames, error, match):
    with pytest.raises(error, match=match):
        Items.of(grid, max_frames=max_frames)


def test_check_inputs_rejects_pixel_rows_that_do_not_match():
    with pytest.raises(ValueError, match=r"pixel_values has 15 patches but the grid \[\[1, 4, 4\]\] needs 16"):
        check_inputs(torch.zeros(15, 3, 14, 14), [[4, 4]], 14)
    with pytest.raises(ValueError, match="the grid holds no item"):
        check_inputs(torch.zeros(0, 3, 14, 14), torch.zeros(0, 2, dtype=torch.int64), 14)
    # Given an Items, its frames still have to fit this tower.
    with pytest.raises(ValueError, match=r"item 0 \(2x2x2\) has 2 frames, but this tower takes images only"):
        check_inputs(torch.zeros(8, 3, 14, 14), Items.of([(2, 2, 2)]), 14, max_frames=1)


def test_offsets_and_tokens_of_images_and_chunks():
    # An image, a 4-frame chunk, a 2-frame chunk, another image: a chunk yields h/2 * w/2 tokens, its
    # frames averaged, but holds t * h * w patches.
    items = Items.of(torch.tensor([[1, 2, 4], [4, 4, 6], [2, 6, 2], [1, 8, 8]]), max_frames=4)
    assert items.rows == ((1, 2, 4), (4, 4, 6), (2, 6, 2), (1, 8, 8))
    assert items.offsets == (0, 8, 104, 128, 192)
    assert items.tokens == (2, 6, 3, 16)
    assert (items.patches, items.outputs, items.longest, items.frames) == (192, 27, 96, 4)
    # (h, w) rows are images.
    assert Items.of([[2, 4], [8, 8]]).rows == ((1, 2, 4), (1, 8, 8))
    # A slice keeps its rows and counts its offsets from its own first item.
    tail = items[1:3]
    assert tail.rows == ((4, 4, 6), (2, 6, 2)) and tail.offsets == (0, 96, 120) and tail.tokens == (6, 3)
    assert items.pick([3, 0]).rows == ((1, 8, 8), (1, 2, 4)) and items.pick([3, 0]).offsets == (0, 64, 72)
    assert Items.of(items) is items and Items.of(items.rows).offsets == items.offsets and len(Items.of([])) == 0
    with pytest.raises(AttributeError, match="immutable"):
        items.rows = ()


def test_build_plan_given_items_does_not_validate_again(monkeypatch):
    grid = [[1, 2, 4], [4, 4, 6], [2, 6, 2]]
    items = Items.of(grid, max_frames=4)
    want = build_plan(grid, 160, 4)  # raw grids still work, validated through Items.of
    checked = []
    # Items.of reads every raw grid through grid_thw_list before checking its values.
    real = items_module.grid_thw_list
    monkeypatch.setattr(items_module, "grid_thw_list", lambda g: checked.append(g) or real(g))
    assert torch.equal(build_plan(items, 160, 4), want)
    assert checked == []
    build_plan(grid, 160, 4)
    assert len(checked) == 1
