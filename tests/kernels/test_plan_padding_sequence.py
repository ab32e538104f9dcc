"""`extend_padding_sequence`: the device-side step that ends a plan built for the images' own total at a
CUDA graph's budget."""

import pytest
import torch

from fused_moonvit.kernels.plan import (build_plan, expand_plan, expand_plan_reference, extend_padding_sequence,
                                        new_device_plan, new_token_meta, plan_numel, upload_plan)

GRIDS = [[4, 6], [2, 2], [6, 2]]  # 40 patches


@pytest.mark.parametrize("budget", [40, 44, 256])
def test_extended_plan_is_the_budgets_plan(device, budget):
    plan = upload_plan(build_plan(GRIDS, 40, 5), new_device_plan(5, device))
    assert extend_padding_sequence(plan, budget) is plan
    want = build_plan(GRIDS, budget, 5)
    assert torch.equal(plan.cpu(), want)
    meta = expand_plan(plan, new_token_meta(budget, device).fill_(-99))
    assert torch.equal(meta.cpu(), expand_plan_reference(want, budget))


def test_writes_only_the_last_cu_seqlens_entry_of_a_view(device):
    """On a row-prefix view of a larger shared buffer (vLLM 0.34), entries past the view stay as they were."""
    shared = torch.full((plan_numel(8),), -5, dtype=torch.int32, device=device)
    view = shared[: plan_numel(3)]
    view.copy_(build_plan(GRIDS, 40, 3).to(device))
    extend_padding_sequence(view, 64)
    assert torch.equal(view.cpu(), build_plan(GRIDS, 64, 3))
    assert (shared[plan_numel(3):] == -5).all()


@pytest.mark.parametrize("budget,error,match", [
    (42, ValueError, "budget must be a multiple of 4.*got 42"),
    (0, ValueError, "budget must be >= 4, got 0"),
    (2**31, ValueError, "must fit in int32, got 2147483648"),
    (64.0, TypeError, "budget must be an int, got float"),
])
def test_refuses_bad_budget(device, budget, error, match):
    plan = upload_plan(build_plan(GRIDS, 40, 3), new_device_plan(3, device))
    before = plan.clone()
    with pytest.raises(error, match=match):
        extend_padding_sequence(plan, budget)
    assert torch.equal(plan, before)


def test_refuses_a_plan_of_the_wrong_dtype(device):
    with pytest.raises(TypeError, match="device_plan must have dtype torch.int32, got torch.int64"):
        extend_padding_sequence(build_plan(GRIDS, 40, 3).long().to(device), 64)
