"""`fused_moonvit.integration.encoder_graph`, the vLLM-free model side of the encoder CUDA-graph protocol,
on the CPU (Triton interpreter, fp32): its buffers, replay values and padding logics, and the whole protocol
driven in each vLLM release's order with a rerun stand-in for the graph (tests/test_gpu_protocol.py does
the same with real captures)."""

import pytest
import torch

from moonvit_fixtures import random_model, random_pixels, rel_err, tiny_config
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
    (torch.zeros(64, 3, 14, 14), [[2, 2], [6, 10]], 1, ValueError, "got 2 items but max_items is 1"),
    (torch.zeros(60, 3, 14, 14), [[2, 2], [6, 10]], 4, ValueError, "has 60 patches but the grid .* needs 64"),
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
    with pytest.raises(ValueError, match="replay plan has 4 item slots but the graph was captured with 3"):
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


def test_runner_and_the_vllm_path_share_plan_step_and_body(encoder, monkeypatch):
    """The graph runner and vLLM's protocol build the same plan for the same items and run the same
    graph body, so at one budget their outputs are the same bits, and each reaches the body exactly once."""
    from fused_moonvit.moonvit import runner as runner_module

    bodies = []
    body = runner_module.graph_body

    def counting_body(model, pixels, plan):
        bodies.append(pixels.shape[0])
        return body(model, pixels, plan)

    monkeypatch.setattr(runner_module, "graph_body", counting_body)
    monkeypatch.setattr(eg, "graph_body", counting_body)
    grid = [[6, 10], [2, 4], [4, 4]]
    pixels = random_pixels(grid, seed=5)
    runner = runner_module.MoonVitGraphRunner(encoder, budgets=[128], max_items=SLOTS)
    ours = torch.cat(runner.encode(pixels, grid))
    buffers = eg.capture_buffers(encoder, 32, SLOTS, torch.device("cpu"), torch.float32)
    buffers[eg.PIXELS_KEY].fill_(float("nan"))  # padding rows: whatever they hold stays out
    values = eg.replay_values(encoder, pixels, grid, SLOTS)
    for key, buffer in buffers.items():
        eg.PADDING_LOGICS[key](buffer, values[key])
    vllm_path = eg.graph_forward(encoder, buffers)[: ours.shape[0]]
    assert bodies == [128, 128]
    assert torch.isfinite(ours).all() and torch.equal(ours, vllm_path)


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


# -- MoonViT3d (Kimi-K2.5): images and video chunks, graphs per frame factor --

FRAMES = (1, 2, 4)  # eg.frame_factors(4)
VIDEO_BUDGETS = [16, 32]

# In this order, through one driver, poisoning every buffer before the marked sets. Token counts are
# h/2 * w/2 whatever t; the graph's frame factor k is the smallest of 1, 2, 4 with 4 T k rows >= patches.
ITEM_SETS = {
    "chunk_exact": [(4, 8, 16)],  # 32 tokens, 512 patches: the (32, 4) graph, no padding rows
    "small_after_chunk": [(4, 2, 2), (4, 4, 6)],  # 7 tokens, 112 patches: (16, 4), a prefix of (32, 4)
    "two_frames_after_poison": [(2, 6, 10)],  # 15 tokens, 120 patches: (16, 2), 8 NaN padding rows
    "mix": [(1, 2, 40), (3, 4, 4), (1, 4, 4), (2, 2, 2)],  # 29 tokens, 152 patches / 116 positions: (32, 2)
    "images_after_poison": [(1, 6, 10), (1, 2, 2)],  # 16 tokens: (16, 1)
    "three_frames": [(3, 6, 6), (1, 2, 2)],  # 10 tokens, 112 patches / 40 positions -> 3 -> (16, 4)
    "oversized": [(1, 16, 16), (2, 2, 2)],  # 65 tokens, the 64-token image alone above the largest budget
}
ITEM_POISON_BEFORE = {"two_frames_after_poison", "images_after_poison"}
ITEM_EXPECTED = {  # (graph of each replay, items per eager batch)
    "per_budget": {"chunk_exact": ([(32, 4)], []), "small_after_chunk": ([(16, 4)], []),
                   "two_frames_after_poison": ([(16, 2)], []), "mix": ([(32, 2)], []),
                   "images_after_poison": ([(16, 1)], []), "three_frames": ([(16, 4)], []),
                   "oversized": ([(16, 2)], [1])},
    "shared_prefix": {"chunk_exact": ([(32, 4)], []), "small_after_chunk": ([(16, 4)], []),
                      "two_frames_after_poison": ([(16, 2)], []), "mix": ([(32, 2)], []),
                      "images_after_poison": ([(16, 1)], []), "three_frames": ([(16, 4)], []),
                      "oversized": ([], [2])},
}


@pytest.fixture(scope="module")
def encoder3d():
    ref = random_model(tiny_config(tower="moonvit3d", pos_emb_time=4), seed=12)
    fused = FusedMoonVit(ref.config)
    fused.load_state_dict(ref.state_dict())
    return fused.eval()


def test_frame_factors():
    assert eg.frame_factors(1) == (1,) and eg.frame_factors(4) == FRAMES and eg.frame_factors(6) == (1, 2, 4, 6)
    assert eg.frame_factor([[2, 2], [4, 6]], FRAMES) == 1  # (h, w) rows are images
    assert eg.frame_factor([(1, 4, 6), (4, 6, 6)], FRAMES) == 4  # 168 patches / 60 positions
    assert eg.frame_factor([(1, 10, 12), (2, 2, 2)], FRAMES) == 2  # 128 / 124
    assert eg.frame_factor([(3, 4, 4)], FRAMES) == 4 and eg.frame_factor([], FRAMES) == 1
    with pytest.raises(ValueError, match="need a frame factor of 4, above the largest captured one, 2"):
        eg.frame_factor([(4, 2, 2)], (1, 2))


def test_capture_buffers_per_frame_factor(encoder3d):
    buffers = eg.capture_buffers(encoder3d, 16, 3, torch.device("cpu"), torch.uint8, frames=4)
    pixels = buffers[eg.PIXELS_KEY]
    # Rows first, so that smaller budgets of the same k view a prefix; read flat, 4 T k patch rows.
    assert pixels.shape == (64, 4, 3, 14, 14) and pixels.dtype == torch.uint8 and eg.buffer_rows(pixels) == 256
    assert torch.equal(buffers[eg.PLAN_KEY], build_plan([], 256, 3))
    with pytest.raises(TypeError, match="raw uint8 pixels .* got torch.float32"):
        eg.copy_pixel_rows(pixels, torch.zeros(8, 3, 14, 14))
    eg.copy_pixel_rows(pixels, torch.full((70, 3, 14, 14), 7, dtype=torch.uint8))
    flat = pixels.view(-1, 3, 14, 14)
    assert (flat[:70] == 7).all() and not flat[70:].any()


def test_graph_forward_returns_the_budgets_rows_and_normalizes(encoder3d):
    grid = [[2, 6, 10], [1, 2, 2]]
    raw = torch.randint(0, 256, (124, 3, 14, 14), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def normalize(x):
        return (x.float() / 255 - 0.5) / 0.25

    buffers = eg.capture_buffers(encoder3d, 16, 4, torch.device("cpu"), torch.uint8, frames=2)
    values = eg.replay_values(encoder3d, raw, grid, 4)
    for key, buffer in buffers.items():
        eg.PADDING_LOGICS[key](buffer, values[key])
    out = eg.graph_forward(encoder3d, buffers, normalize)
    assert out.shape == (16, 24) and torch.isfinite(out).all()
    want = encoder3d(normalize(raw), grid)
    assert rel_err(out[:16], want) <= 1e-5


def test_replay_values_refuse_too_many_frames(encoder3d):
    with pytest.raises(ValueError, match=r"item 1 \(5x2x2\) has 5 frames, but the tower's time embedding has 4"):
        eg.replay_values(encoder3d, torch.zeros(24, 3, 14, 14), [[1, 2, 2], [5, 2, 2]], 4)


@pytest.mark.parametrize("layout", ["per_budget", "shared_prefix"])
def test_protocol_with_video_chunks_in_each_managers_order(encoder3d, layout):
    driver = ProtocolDriver(encoder3d, VIDEO_BUDGETS, SLOTS, layout, rerun_capture, frames=FRAMES)
    driver.capture()
    assert sorted(driver.graphs) == [(b, k) for b in VIDEO_BUDGETS for k in FRAMES]
    if layout == "shared_prefix":
        for k in FRAMES:  # shared within a frame factor, not across
            for key in eg.BUFFER_KEYS:
                assert driver.graphs[16, k].buffers[key].data_ptr() == driver.graphs[32, k].buffers[key].data_ptr()
        assert driver.graphs[16, 1].buffers[eg.PIXELS_KEY].data_ptr() != \
            driver.graphs[16, 2].buffers[eg.PIXELS_KEY].data_ptr()
    figures = check_sets(driver, dict(list(ITEM_SETS.items())[:2]), tolerance=1e-5)
    if layout == "shared_prefix":
        # the (16, 4) graph's padding rows still hold the chunk's pixels: nothing cleared them
        stale = driver.graphs[16, 4].buffers[eg.PIXELS_KEY].view(-1, 3, 14, 14)[112:256]
        assert torch.equal(stale, random_pixels([[4, 8, 16]], seed=0)[112:256])
    figures |= check_sets(driver, dict(list(ITEM_SETS.items())[2:]), tolerance=1e-5,
                          poison_before=ITEM_POISON_BEFORE, seed=2)
    for name, (replays, eager) in ITEM_EXPECTED[layout].items():
        assert (figures[name]["replays"], figures[name]["eager_batches"]) == (replays, eager), name
