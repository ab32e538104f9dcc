"""Parity of MoonViT3d (Kimi-K2.5 / K2.6, and Kimi-K3's options) with the installed vLLM's own
`MoonViT3dPretrainedModel` + `KimiK25MultiModalProjector`, same random weights: the eager reference and
the fused encoder (Triton interpreter on the CPU), on images, video chunks of 2 to 4 frames, and batches
that mix them.

vLLM builds its fixed time table in numpy and we in torch; the two differ by an fp32 ulp (under 5e-7),
which is far below the bound.

Without a GPU, vLLM's tower rotates q and k with its PyTorch path, which vLLM runs where there is no
Triton: its Triton kernel under the interpreter (a program per 4 tokens per head) took most of this
module's time. vLLM's kernel matches that path to an ulp; test_fp32_parity_with_vllms_triton_rope holds
ours to the kernel on one item set.
"""

import pytest
import torch

from moonvit_fixtures import K3_OPTIONS, random_model, random_pixels, rel_err, tiny_k25_config
from vllm_peer import VllmMoonViT3d

from fused_moonvit.moonvit import FusedMoonVit

pytestmark = pytest.mark.vllm

# A 16x16 position table (the real one is 64x64): a 16x16 grid is the identity case, at a size the
# interpreter runs in seconds.
CONFIGS = {"k25": {}, "k3": K3_OPTIONS}
ITEM_SETS = {
    "images": [(1, 6, 10), (1, 2, 2), (1, 20, 12)],
    "table_size": [(1, 16, 16), (3, 16, 16)],
    "chunk_4": [(4, 8, 12)],
    "chunks_2_3": [(2, 6, 4), (3, 4, 4)],
    "mixed": [(1, 4, 6), (4, 6, 8), (1, 2, 2), (2, 10, 4)],
}


@pytest.fixture(scope="module", autouse=True)
def stock_rope_without_triton():
    if torch.cuda.is_available():
        yield
        return
    from vllm.model_executor.models import kimi_k25_vit

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(kimi_k25_vit, "HAS_TRITON", False)
        yield


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    cfg = tiny_k25_config(**CONFIGS[request.param])
    ref = random_model(cfg, seed=sorted(CONFIGS).index(request.param) + 30)
    fused = FusedMoonVit(cfg)
    fused.load_state_dict(ref.state_dict())
    return ref, fused.eval(), VllmMoonViT3d(cfg, ref.state_dict(), torch.float32)


@pytest.mark.parametrize("item_set", sorted(ITEM_SETS))
def test_fp32_parity(models, item_set):
    _assert_fp32_parity(models, item_set)


def test_fp32_parity_with_vllms_triton_rope(models, monkeypatch):
    """vLLM's Triton kernel for q and k, as on a GPU (the interpreter runs it on the CPU)."""
    from vllm.model_executor.models import kimi_k25_vit

    monkeypatch.setattr(kimi_k25_vit, "HAS_TRITON", True)
    _assert_fp32_parity(models, "chunks_2_3")


def _assert_fp32_parity(models, item_set):
    ref, fused, peer = models
    items = ITEM_SETS[item_set]
    pix = random_pixels(items, seed=sorted(ITEM_SETS).index(item_set))
    g = torch.tensor(items)
    want = peer(pix, g)
    assert want.shape == (sum(h * w // 4 for _, h, w in items), 24)
    for name, model in (("reference", ref), ("fused", fused)):
        got = model(pix, g)
        assert got.shape == want.shape and torch.isfinite(got).all()
        err = rel_err(got, want)
        print(f"fp32 {item_set} {name}: ||ours - vllm|| / ||vllm|| = {err:.2e}")
        assert err <= 1e-5, name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_parity(name):
    """bf16: the fused encoder against vLLM, and each against the fp32 reference; ours within 1.25x of
    vLLM's error (on the CPU neither runs the GPU's kernels; the H200 tests hold the graph to 1.0x of the
    bf16 reference)."""
    cfg = tiny_k25_config(**CONFIGS[name])
    ref32 = random_model(cfg, seed=40)
    ours = FusedMoonVit(cfg)
    ours.load_state_dict(ref32.state_dict())
    ours = ours.to(torch.bfloat16).eval()
    peer = VllmMoonViT3d(cfg, ref32.state_dict(), torch.bfloat16)
    items = ITEM_SETS["mixed"] + ITEM_SETS["table_size"]
    pix = random_pixels(items, seed=41)
    g = torch.tensor(items)
    exact = ref32(pix, g)
    got, want = ours(pix.to(torch.bfloat16), g), peer(pix, g)
    assert got.dtype == want.dtype == torch.bfloat16
    vs_peer, ours_vs_fp32, peer_vs_fp32 = rel_err(got, want), rel_err(got, exact), rel_err(want, exact)
    print(f"bf16 {name}: ours-vllm {vs_peer:.2e}, ours-fp32 {ours_vs_fp32:.2e}, vllm-fp32 {peer_vs_fp32:.2e}")
    assert vs_peer <= 2e-2
    assert ours_vs_fp32 <= 1.25 * peer_vs_fp32


def test_64x64_grid_at_the_real_table_size():
    """The real 64x64 table: a 64x64 image is the identity that vLLM skips, and its neighbour 62x64 is not."""
    cfg = tiny_k25_config(init_pos_emb_height=64, init_pos_emb_width=64, num_hidden_layers=1)
    ref = random_model(cfg, seed=50)
    fused = FusedMoonVit(cfg)
    fused.load_state_dict(ref.state_dict())
    peer = VllmMoonViT3d(cfg, ref.state_dict(), torch.float32)
    items = [(1, 64, 64), (1, 62, 64)]
    pix = random_pixels(items, seed=51)
    g = torch.tensor(items)
    want = peer(pix, g)
    for name, model in (("reference", ref), ("fused", fused.eval())):
        err = rel_err(model(pix, g), want)
        print(f"fp32 64x64 {name}: {err:.2e}")
        assert err <= 1e-5, name
