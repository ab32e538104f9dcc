"""Parity of `MoonVitReference` with the installed vLLM's (0.33.0 or 0.34.0) own MoonVit + Kimi-VL projector, same
random weights.

These tests need the `vllm` extra; they are meant to run (not be skipped) in CI.
"""

import pytest
import torch

from moonvit_fixtures import random_model, random_pixels, rel_err, tiny_config
from vllm_peer import VllmMoonVit

pytestmark = pytest.mark.vllm

CONFIGS = {
    # the real 64x64 position table, so a 64x64 grid is the identity case
    "tiny": dict(init_pos_emb_height=64, init_pos_emb_width=64),
    # the real head dim, so all 18 RoPE frequencies are exercised
    "head72": dict(num_hidden_layers=1, hidden_size=144, num_attention_heads=2, intermediate_size=96,
                   init_pos_emb_height=64, init_pos_emb_width=64),
}
IMAGE_SETS = {
    "non_square": [(6, 10)],
    "grid_64x64": [(64, 64)],
    "single_2x2": [(2, 2)],
    "several": [(2, 2), (6, 10), (16, 16), (20, 12)],
    "thin": [(2, 40), (40, 2)],
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    cfg = tiny_config(**CONFIGS[request.param])
    ours = random_model(cfg, seed=sorted(CONFIGS).index(request.param))
    return ours, VllmMoonVit(cfg, ours.state_dict(), torch.float32)


@pytest.mark.parametrize("image_set", sorted(IMAGE_SETS))
def test_fp32_parity(pair, image_set):
    ours, peer = pair
    grids = IMAGE_SETS[image_set]
    pix = random_pixels(grids, seed=len(image_set))
    g = torch.tensor(grids)
    want = peer(pix, g)
    got = ours(pix, g)
    assert got.shape == want.shape == (sum(h * w // 4 for h, w in grids), 24)
    assert torch.isfinite(got).all()
    err = rel_err(got, want)
    print(f"fp32 {image_set}: ||ours - vllm|| / ||vllm|| = {err:.2e}")
    assert err <= 1e-5


def test_bf16_parity():
    """bf16: ours against vLLM, and each against the fp32 reference; ours is no worse than vLLM's."""
    cfg = tiny_config(**CONFIGS["head72"])
    ref32 = random_model(cfg, seed=7)
    ours = random_model(cfg, seed=7, dtype=torch.bfloat16)
    peer = VllmMoonVit(cfg, ref32.state_dict(), torch.bfloat16)
    grids = IMAGE_SETS["several"] + [(64, 64)]
    pix = random_pixels(grids, seed=8)
    g = torch.tensor(grids)
    exact = ref32(pix, g)
    got, want = ours(pix, g), peer(pix, g)
    assert got.dtype == want.dtype == torch.bfloat16
    vs_peer, ours_vs_fp32, peer_vs_fp32 = rel_err(got, want), rel_err(got, exact), rel_err(want, exact)
    print(f"bf16: ours-vllm {vs_peer:.2e}, ours-fp32 {ours_vs_fp32:.2e}, vllm-fp32 {peer_vs_fp32:.2e}")
    assert vs_peer <= 2e-2
    assert ours_vs_fp32 <= 1.25 * peer_vs_fp32
