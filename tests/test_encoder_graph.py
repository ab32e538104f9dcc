"""`fused_moonvit.integration.encoder_graph`, the vLLM-free model side of the encoder CUDA-graph protocol,
on the CPU (Triton interpreter, fp32): its buffers, replay values and padding logics, and the whole protocol
driven in each vLLM release's order with a rerun stand-in for the graph (tests/test_gpu_protocol.py does
the same with real captures)."""

import pytest
import torch

from moonvit_fixtures import random_model, random_pixels, tiny_config
from protocol_drivers import ProtocolDriver, check_sets, rerun_capture

from fused_moonvit.integration import encoder_graph as eg
from fused_moonvit.kernels.plan import build_plan, plan_cu_seqlens, plan_numel
from fused_moonvit.moonvit import FusedMoonVit

TOKEN_BUDGETS = [16, 32, 64]
SLOTS = 4

# In this order, through one driver: a small budget follows a larger one whose pixels are still in the
# shared rows; then every buffer is poisoned (NaN pixels, a random plan) before the next sets.
IMAGE_SETS = {
    "largest_exact": [(16, 16)],  # 64 tokens: the largest budget, no padding rows
    "small_after_large": [(2, 2), (4, 6)],  # 7 tokens in the 16 budget: rows 28..63 hold the last set's
    "after_poison": [(10, 12)],  # 30 tokens in the 32 budget, 8 NaN padding rows
    "thin_mix": [(2, 40), (40, 2), (4, 4)],  # 44 tokens; past the 16x16 position table on one side
    "oversized": [(18, 16), (2, 2)],  # 73 tokens, one image alone above the largest budget
    "more_than_slots": [(4, 4)] * 5,
}
POISON_BEFORE = {"after_poison", "oversized"}

# (token budget of each replay, images per eager batch), per set
EXPECTED = {
    "per_budget": {"largest_exact": ([64], []), "small_after_large": ([16], []), "after_poison": ([32], []),
                   "thin_mix": ([64], []), "oversized": ([16], [1]), "more_than_slots": ([16, 16], [])},
    "shared_prefix": {"largest_exact": ([64], []), "small_after_large": ([16], []), "after_poison": ([32], []),
                      "thin_mix": ([64], []), "oversized": ([], [2]), "more_than_slots": ([], [5])},
}


@pytest.fixture(scope="module")
def encoder():
    ref = random_model(tiny_config(), seed=11)
    fused = FusedMoonVit(ref.config)
    fused.load_state_dict(ref.state_dict())
    return fused.eval()


def test_capture_buffers(encoder):
    buffers = eg.capture_buffers(encoder, 20, 3, torch.device("cpu"), torch.float32)
    assert list(buffers) == list(eg.BUFFER_KEYS)
    pixels, plan = buffers[eg.PIXELS_KEY], buffers[eg.PLAN_KEY]
    assert pixels.shape == (80, 3, 14, 14) and pixels.dtype == torch.float32 and not pixels.any()
    # all padding: every slot empty, one padding sequence over the whole budget
    assert torch.equal(plan, build_plan([], 80, 3))
    out = eg.graph_forward(encoder, buffers)
    assert out.shape == (20, 24) and torch.isfinite(out).all()


def test_replay_values_plan_ends_at_the_images(encoder):
    grid = [[2, 2], [6, 10]]
    pixels = random_pixels(grid)
    values = eg.replay_values(encoder, pixels, grid, 5)
    assert values[eg.PIXELS_KEY] is pixels
    assert torch.equal(values[eg.PLAN_KEY], build_plan(grid, 64, 5))


@pytest.mark.parametrize("pixels,grid,slots,error,match", [
    (torch.zeros(64, 3, 14, 14), [[2, 2], [6, 10]], 1, ValueError, "got 2 images but max_images is 1"),
    (torch.zeros(60, 3, 14, 14), [[2, 2], [6, 10]], 4, ValueError, "more than the budget 60"),
    (torch.zeros(68, 3, 14, 14), [[2, 2], [6, 10]], 4, ValueError, "has 68 patches but the grid .* needs 64"),
    (torch.zeros(15, 3, 14, 14), [[3, 5]], 4, ValueError, "h must be even"),
    (torch.zeros(64, 3, 16, 16), [[8, 8]], 4, ValueError, r"shape \(N, 3, 14, 14\)"),
    (torch.zeros(64, 3, 14, 14, dtype=torch.int32), [[8, 8]], 4, TypeError, "floating-point"),
])
def test_replay_values_refuse_bad_input(encoder, pixels, grid, slots, error, match):
    with pytest.raises(error, match=match):
        eg.replay_values(encoder, pixels, grid, slots)


def test_copy_pixel_rows_leaves_padding_rows():
    buffer = torch.full((16, 3, 2, 2), float("nan"))
    src = torch.randn(8, 3, 2, 2)
    eg.copy_pixel_rows(buffer, src)
    assert torch.equal(buffer[:8], src) and buffer[8:].isnan().all()
    with pytest.raises(ValueError, match=r"\(20, 3, 2, 2\) do not fit .* \(16, 3, 2, 2\)"):
        eg.copy_pixel_rows(buffer, torch.zeros(20, 3, 2, 2))


def test_copy_plan_writes_the_whole_plan_of_matching_slots():
    buffer = torch.full((plan_numel(3),), -7, dtype=torch.int32)
    plan = build_plan([[2, 2]], 4, 3)
    eg.copy_plan(buffer, plan)
    assert torch.equal(buffer, plan)
    with pytest.raises(ValueError, match="replay plan has 4 image slots but the graph was captured with 3"):
        eg.copy_plan(buffer, build_plan([[2, 2]], 4, 4))


def test_graph_forward_extends_the_padding_sequence(encoder):
    """The body ends the plan's padding sequence at the buffer's rows, so a plan built for the images'
    total computes what the budget's own plan does."""
    grid = [[6, 10], [2, 2]]
    buffers = eg.capture_buffers(encoder, 32, 4, torch.device("cpu"), torch.float32)
    values = eg.replay_values(encoder, random_pixels(grid, seed=3), grid, 4)
    for key, buffer in buffers.items():
        eg.PADDING_LOGICS[key](buffer, values[key])
    assert plan_cu_seqlens(buffers[eg.PLAN_KEY])[-1] == 64
    out = eg.graph_forward(encoder, buffers)
    assert plan_cu_seqlens(buffers[eg.PLAN_KEY])[-1] == 128
    assert torch.equal(buffers[eg.PLAN_KEY], build_plan(grid, 128, 4))
    assert torch.equal(out, encoder.forward_static(buffers[eg.PIXELS_KEY], build_plan(grid, 128, 4)))


@pytest.mark.parametrize("layout,slots", [("per_budget", SLOTS), ("shared_prefix", SLOTS),
                                          ("shared_prefix", {16: 2, 32: 3, 64: SLOTS})],
                         ids=["per_budget", "shared_prefix", "shared_prefix_slots_per_budget"])
def test_protocol_in_each_managers_order(encoder, layout, slots):
    driver = ProtocolDriver(encoder, TOKEN_BUDGETS, slots, layout, rerun_capture)
    driver.capture()
    if layout == "shared_prefix":
        largest = driver.graphs[64].buffers
        for budget in (16, 32):
            for key, buffer in driver.graphs[budget].buffers.items():
                assert buffer.data_ptr() == largest[key].data_ptr(), f"{key} of budget {budget} is not shared"
        assert driver.graphs[16].output.data_ptr() == driver.graphs[64].output.data_ptr()
        if isinstance(slots, dict):
            assert driver.graphs[16].buffers[eg.PLAN_KEY].numel() == plan_numel(2) < largest[eg.PLAN_KEY].numel()

    sets = dict(list(IMAGE_SETS.items())[:2])
    figures = check_sets(driver, sets, tolerance=1e-5)
    if layout == "shared_prefix":
        # the 16 budget's padding rows still hold the previous set's pixels: nothing cleared them
        stale = driver.graphs[16].buffers[eg.PIXELS_KEY][28:64]
        previous = random_pixels([[16, 16]], seed=0)[28:64]
        assert torch.equal(stale, previous)
    figures |= check_sets(driver, dict(list(IMAGE_SETS.items())[2:]), tolerance=1e-5,
                          poison_before=POISON_BEFORE, seed=2)
    assert driver.graphs[32].buffers[eg.PIXELS_KEY][120:].isnan().all()  # poisoned, never cleared
    for name, (replays, eager) in EXPECTED[layout].items():
        assert (figures[name]["replays"], figures[name]["eager_batches"]) == (replays, eager), name
