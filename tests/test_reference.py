"""The eager reference: structure, numerics of its pieces, and attention confined to each image."""

import pytest
import torch
import torch.nn.functional as F

from moonvit_fixtures import random_model, random_pixels, rel_err, tiny_config
from fused_moonvit.moonvit import MoonVitConfig, MoonVitReference
from fused_moonvit.moonvit.modules import rope_frequencies
from fused_moonvit.moonvit.reference import interpolate_pos_table, merge_2x2, rope_angles, rotate_pairs


def test_state_dict_keys_are_checkpoint_names():
    cfg = tiny_config(num_hidden_layers=1)
    shapes = {k: tuple(v.shape) for k, v in MoonVitReference(cfg).state_dict().items()}
    c, t = cfg.hidden_size, cfg.text_hidden_size
    assert shapes["vision_tower.patch_embed.proj.weight"] == (c, 3, 14, 14)
    assert shapes["vision_tower.patch_embed.pos_emb.weight"] == (16, 16, c)
    assert shapes["vision_tower.encoder.blocks.0.wqkv.weight"] == (3 * c, c)
    assert shapes["vision_tower.encoder.blocks.0.mlp.fc0.weight"] == (cfg.intermediate_size, c)
    assert shapes["vision_tower.encoder.final_layernorm.bias"] == (c,)
    assert shapes["multi_modal_projector.linear_1.weight"] == (4 * c, 4 * c)
    assert shapes["multi_modal_projector.linear_2.weight"] == (t, 4 * c)
    assert all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in shapes)
    assert len(shapes) == 3 + 12 + 2 + 6


def test_default_config_has_kimi_vl_sizes():
    n = sum(p.numel() for p in MoonVitReference(MoonVitConfig(num_hidden_layers=1)).parameters())
    cfg = MoonVitConfig()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.text_hidden_size) == (27, 1152, 16, 72, 4304, 2048)
    # one block: wqkv + wo + fc0 + fc1 + two norms
    block = 1152 * 3456 + 3456 + 1152 * 1152 + 1152 + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    stem = 1152 * 588 + 1152 + 64 * 64 * 1152 + 2 * 1152
    proj = 2 * 1152 + 4608 * 4608 + 4608 + 4608 * 2048 + 2048
    assert n == block + stem + proj


def test_pos_table_bicubic_matches_fp64_interpolate():
    torch.manual_seed(1)
    table = torch.randn(16, 16, 5)
    for h, w in [(16, 16), (2, 40), (40, 2), (12, 30), (64, 64)]:
        got = interpolate_pos_table(table, h, w)
        want = F.interpolate(table.double().permute(2, 0, 1)[None], size=(h, w), mode="bicubic",
                             align_corners=False)[0].permute(1, 2, 0).reshape(h * w, 5)
        assert got.shape == (h * w, 5)
        assert rel_err(got, want) < 3e-6, (h, w)  # fp32 weights and sums against fp64
    assert torch.equal(interpolate_pos_table(table, 16, 16), table.flatten(0, 1))


def test_rope_matches_complex_multiply():
    torch.manual_seed(2)
    h, w, heads, d = 6, 10, 3, 72
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    x = torch.randn(h * w, heads, d)
    ang = rope_angles(rows, cols, rope_frequencies(d))
    got = rotate_pairs(x, ang.cos(), ang.sin())
    # complex form, fp64: frequency i turns pair 2i by the column and pair 2i+1 by the row
    f = 1.0 / (10000.0 ** (torch.arange(0, d, 4, dtype=torch.float64)[: d // 4] / d))
    theta = torch.stack([cols[:, None] * f, rows[:, None] * f], -1).reshape(h * w, 1, d // 2)
    want = torch.view_as_real(torch.view_as_complex(x.double().view(h * w, heads, d // 2, 2))
                              * torch.polar(torch.ones_like(theta), theta)).flatten(-2)
    assert rel_err(got, want) < 1e-6
    assert torch.equal(got[0], x[0])  # (row, col) = (0, 0) is not turned


def test_merge_order():
    h, w, c = 4, 6, 3
    x = torch.arange(h * w * c, dtype=torch.float32).view(h * w, c)
    m = merge_2x2(x, h, w)
    assert m.shape == (6, 4, c)
    # merged token (1, 2): rows 2..3, cols 4..5; sub-tokens (0,0),(0,1),(1,0),(1,1)
    idx = [2 * w + 4, 2 * w + 5, 3 * w + 4, 3 * w + 5]
    assert torch.equal(m[1 * 3 + 2], x[idx])


@pytest.mark.parametrize("grids", [[(4, 6)], [(2, 2), (6, 4), (16, 16)], [(2, 18), (18, 2)]])
def test_batch_equals_images_alone(grids):
    """Attention stays inside each image: a batch gives each image's lone output."""
    model = random_model(tiny_config(), seed=3)
    pix = random_pixels(grids, seed=4)
    out = model(pix, torch.tensor(grids))
    assert out.shape == (sum(h * w // 4 for h, w in grids), 24)
    assert torch.isfinite(out).all()
    p0 = o0 = 0
    for h, w in grids:
        alone = model(pix[p0:p0 + h * w], torch.tensor([[h, w]]))
        torch.testing.assert_close(out[o0:o0 + h * w // 4], alone, rtol=1e-5, atol=1e-5)
        p0, o0 = p0 + h * w, o0 + h * w // 4


def test_bf16_tracks_fp32():
    grids = [(8, 6), (16, 16)]
    m32 = random_model(tiny_config(), seed=5)
    m16 = random_model(tiny_config(), seed=5, dtype=torch.bfloat16)
    pix = random_pixels(grids, seed=6)
    ref = m32(pix, torch.tensor(grids))
    got = m16(pix, torch.tensor(grids))
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) < 3e-2


def test_tower_only_outputs_merged_features():
    cfg = tiny_config(text_hidden_size=None)
    model = random_model(cfg, seed=7)
    assert model.multi_modal_projector is None
    out = model(random_pixels([(4, 4)]), torch.tensor([[4, 4]]))
    assert out.shape == (4, 4 * cfg.hidden_size)


@pytest.mark.parametrize("grid, pix_n, match", [
    ([[3, 4]], 12, "not a multiple of the merge size"),
    ([[4, 514]], 4 * 514, "outside 1..512"),
    ([[0, 4]], 0, "outside 1..512"),
    ([[4, 4]], 15, "needs 16"),
    ([[4.0, 4.0]], 16, "integers"),
    ([4, 4], 16, "shape"),
])
def test_bad_inputs(grid, pix_n, match):
    model = random_model(tiny_config(num_hidden_layers=1), seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        model(torch.randn(pix_n, 3, 14, 14), torch.tensor(grid))


def test_bad_pixel_shape():
    model = random_model(tiny_config(num_hidden_layers=1), seed=0)
    with pytest.raises(ValueError, match=r"\(N, 3, 14, 14\)"):
        model(torch.randn(16, 3, 16, 16), torch.tensor([[4, 4]]))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        MoonVitConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="merge"):
        MoonVitConfig(merge_kernel_size=(3, 3))
