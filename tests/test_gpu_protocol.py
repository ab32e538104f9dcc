"""The vLLM encoder-graph protocol's model side (`integration/encoder_graph.py`) through real CUDA graph
captures, in the order of each vLLM release's manager (tests/protocol_drivers.py), against the fused eager
forward. CUDA only; needs no vLLM. What a CPU stand-in cannot show: everything recorded at capture time,
the plan's padding-sequence patch-up included, replayed on buffers that other budgets' captures and
replays (and NaN) have written since.

A MoonVit of the real width (1152 hidden, 16 heads of 72, 4304 MLP, 64x64 position table, 2048 text
hidden) with 2 layers, bf16 random weights; budgets of 64 to 1024 output tokens (256 to 4096 patches).
Each graph output must equal, bitwise, the same budget's computation on clean buffers, and match the
eager forward to bf16 accuracy. `FUSED_MOONVIT_GPU_FIGURES=path.json` writes the figures.
"""

import json
import os

import pytest
import torch

from moonvit_fixtures import random_model
from protocol_drivers import ProtocolDriver, check_sets, cuda_graph_capture

from fused_moonvit.integration import encoder_graph as eg
from fused_moonvit.moonvit import FusedMoonVit, MoonVitConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CONFIG = dict(num_hidden_layers=2)  # MoonVitConfig's defaults are the real sizes
TOKEN_BUDGETS = [64, 128, 256, 512, 1024]
SLOTS = 8
TOLERANCE = 1e-2  # bf16 graph vs bf16 eager: only the budget (GEMM shapes, padding) differs

# In this order through one driver. Sets alternate between large and small budgets, so a small budget
# replays on rows a larger one left behind; before the marked sets every buffer is poisoned (NaN pixels,
# a random plan).
IMAGE_SETS = {
    "448_in_256": [(32, 32)],  # exactly one budget, no padding rows
    "224_after_448": [(16, 16)],  # 64 tokens: the smallest budget, right after a larger one
    "mix_after_poison": [(16, 16), (48, 20), (2, 2), (30, 40)],  # 605 tokens
    "small_after_mix": [(10, 10), (2, 40)],  # 45 tokens
    "largest": [(64, 62)],  # 992 tokens
    "thin_after_poison": [(2, 200), (200, 2), (6, 6)],  # 209 tokens
    "eight_small": [(10, 10)] * 8,  # all slots
    "nine_small": [(10, 10)] * 9,  # more images than slots
    "above_largest": [(66, 64), (8, 8)],  # 1072 tokens, the 66x64 alone above the largest budget
}
POISON_BEFORE = {"mix_after_poison", "thin_after_poison", "above_largest"}

EXPECTED = {  # (replays, images per eager batch) per set
    "per_budget": {"448_in_256": ([256], []), "224_after_448": ([64], []), "mix_after_poison": ([1024], []),
                   "small_after_mix": ([64], []), "largest": ([1024], []), "thin_after_poison": ([256], []),
                   "eight_small": ([256], []), "nine_small": ([256, 64], []), "above_largest": ([64], [1])},
    "shared_prefix": {"448_in_256": ([256], []), "224_after_448": ([64], []), "mix_after_poison": ([1024], []),
                      "small_after_mix": ([64], []), "largest": ([1024], []), "thin_after_poison": ([256], []),
                      "eight_small": ([256], []), "nine_small": ([], [9]), "above_largest": ([], [2])},
}

FIGURES = {}


@pytest.fixture(scope="module")
def encoder():
    reference = random_model(MoonVitConfig(**CONFIG), seed=0)
    fused = FusedMoonVit(reference.config)
    fused.load_state_dict(reference.state_dict())
    yield fused.to("cuda", torch.bfloat16).eval()
    path = os.environ.get("FUSED_MOONVIT_GPU_FIGURES")
    if path:
        import triton

        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "config": CONFIG, "token_budgets": TOKEN_BUDGETS, "slots": SLOTS}
        with open(path, "w") as f:
            json.dump({"meta": meta, "layouts": FIGURES}, f, indent=1)


@pytest.mark.parametrize("layout,slots", [("per_budget", SLOTS), ("shared_prefix", SLOTS),
                                          ("shared_prefix", {64: 2, 128: 4, 256: 8, 512: 8, 1024: 8})],
                         ids=["vllm_0.33_per_budget", "vllm_0.34_shared_prefix", "shared_prefix_slots_per_budget"])
def test_real_captures_in_each_managers_order(encoder, layout, slots):
    capture = cuda_graph_capture(torch.cuda.graph_pool_handle())
    driver = ProtocolDriver(encoder, TOKEN_BUDGETS, slots, layout, capture)
    driver.capture()
    if layout == "shared_prefix":
        largest = driver.graphs[TOKEN_BUDGETS[-1]]
        for budget in TOKEN_BUDGETS[:-1]:
            graph = driver.graphs[budget]
            assert graph.output.data_ptr() == largest.output.data_ptr()
            for key in eg.BUFFER_KEYS:
                assert graph.buffers[key].data_ptr() == largest.buffers[key].data_ptr(), (key, budget)
    image_sets = IMAGE_SETS
    if isinstance(slots, dict):  # the 64 budget has 2 slots: its two-image set goes there, the 8/9 sets differ
        image_sets = {k: v for k, v in IMAGE_SETS.items() if k not in ("eight_small", "nine_small")}
    figures = check_sets(driver, image_sets, tolerance=TOLERANCE, poison_before=POISON_BEFORE)
    FIGURES[f"{layout}{'_slots_per_budget' if isinstance(slots, dict) else ''}"] = figures
    for name, figure in figures.items():
        print(f"{layout} {name}: replays {figure['replays']}, eager {figure['eager_batches']}, "
              f"max rel err vs eager {figure['max_rel_err_vs_eager']:.2e}")
        assert (figure["replays"], figure["eager_batches"]) == EXPECTED[layout][name], name


# -- MoonViT3d (Kimi-K2.5 / K2.6): images and video chunks, graphs per frame factor --

CONFIG_3D = dict(num_hidden_layers=2, tower="moonvit3d", pos_emb_time=4)
VIDEO_BUDGETS = [64, 256, 1024]
FRAMES = (1, 2, 4)
# k: the smallest of 1, 2, 4 with 4 T k >= the batch's patches (encoder_graph.frame_factor)
ITEM_SETS = {
    "chunk_exact": [(4, 32, 32)],  # 256 tokens, 4096 patches: the (256, 4) graph, no padding rows
    "image_after_chunk": [(1, 16, 16)],  # 64 tokens: (64, 1)
    "small_chunk_after_poison": [(4, 16, 16)],  # 64 tokens: (64, 4), a prefix of (1024, 4) on 0.34
    "mix_after_poison": [(1, 32, 32), (2, 24, 20), (2, 10, 10), (3, 2, 40)],  # 421 tokens: (1024, 2)
    "two_frames": [(2, 30, 40)],  # 300 tokens: (1024, 2)
}
ITEM_POISON_BEFORE = {"small_chunk_after_poison", "mix_after_poison"}
ITEM_EXPECTED = {"chunk_exact": [(256, 4)], "image_after_chunk": [(64, 1)], "small_chunk_after_poison": [(64, 4)],
                 "mix_after_poison": [(1024, 2)], "two_frames": [(1024, 2)]}


@pytest.fixture(scope="module")
def encoder3d():
    reference = random_model(MoonVitConfig(**CONFIG_3D), seed=1)
    fused = FusedMoonVit(reference.config)
    fused.load_state_dict(reference.state_dict())
    return fused.to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("layout", ["per_budget", "shared_prefix"])
def test_real_captures_with_video_chunks(encoder3d, layout):
    capture = cuda_graph_capture(torch.cuda.graph_pool_handle())
    driver = ProtocolDriver(encoder3d, VIDEO_BUDGETS, SLOTS, layout, capture, frames=FRAMES)
    driver.capture()
    figures = check_sets(driver, ITEM_SETS, tolerance=TOLERANCE, poison_before=ITEM_POISON_BEFORE)
    FIGURES[f"moonvit3d_{layout}"] = figures
    for name, figure in figures.items():
        print(f"moonvit3d {layout} {name}: replays {figure['replays']}, "
              f"max rel err vs eager {figure['max_rel_err_vs_eager']:.2e}")
        assert (figure["replays"], figure["eager_batches"]) == (ITEM_EXPECTED[name], []), name
