"""Parity of MoonViT3d (Kimi-K2.5 / K2.6) with transformers' native `Kimi_K25VisionModel` and
`Kimi_K25MultimodalProjection`, same random weights: the eager reference and the fused encoder.

transformers 5.22 differs from vLLM in ways these tests work around, not in the result:
- it keeps q and k weights permuted for its rotate-half RoPE (the checkpoint converter's `PermuteForRope`:
  per head, value 2j + r moves to r * D/2 + j), so the weights are permuted here the same way;
- it always interpolates the position table, through `embedding_bag` weights (within 4e-6 of
  `F.interpolate` on a unit-variance table);
- its merge index is built per frame count, so a batch may not mix items of different t: items are sent
  to it in groups of equal t and compared in our batch order;
- it has no Kimi-K3 options (RMSNorm, bilinear, the v2 projector).
"""

import types

import pytest
import torch

from moonvit_fixtures import k25_vision_config, random_model, random_pixels, rel_err, tiny_k25_config

from fused_moonvit.moonvit import FusedMoonVit

ITEM_SETS = {
    "images": [(1, 6, 10), (1, 2, 2), (1, 20, 12)],
    "table_size": [(1, 16, 16), (3, 16, 16)],
    "chunks": [(4, 8, 12), (2, 6, 4), (3, 4, 4)],
    "mixed": [(1, 4, 6), (4, 6, 8), (1, 2, 2), (2, 10, 4)],
}


def rope_permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows from interleaved (real, imag) pairs to transformers' rotate-half halves, per head."""
    rows = weight.shape[0]
    head_dim = rows // heads
    return weight.reshape(heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(rows, *weight.shape[1:])


def transformers_state_dict(ours: dict, config) -> dict:
    """Our checkpoint-named tensors under transformers' module names (its conversion mapping)."""
    heads, width = config.num_attention_heads, config.attention_width
    out = {"patch_embed.proj.weight": ours["vision_tower.patch_embed.proj.weight"],
           "patch_embed.proj.bias": ours["vision_tower.patch_embed.proj.bias"],
           "patch_embed.pos_emb.position_embeddings": ours["vision_tower.patch_embed.pos_emb.weight"]}
    for i in range(config.num_hidden_layers):
        ours_block, theirs = f"vision_tower.encoder.blocks.{i}.", f"layers.{i}."
        for src, dst in (("norm0", "norm1"), ("norm1", "norm2"), ("wo", "attn.proj"), ("mlp.fc0", "mlp.fc1"),
                         ("mlp.fc1", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"{theirs}{dst}.{kind}"] = ours[f"{ours_block}{src}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = ours[f"{ours_block}wqkv.{kind}"].split(width)
            out[f"{theirs}attn.q_proj.{kind}"] = rope_permuted(q, heads)
            out[f"{theirs}attn.k_proj.{kind}"] = rope_permuted(k, heads)
            out[f"{theirs}attn.v_proj.{kind}"] = v
    for kind in ("weight", "bias"):
        out[f"final_layernorm.{kind}"] = ours[f"vision_tower.encoder.final_layernorm.{kind}"]
    return out


class TransformersK25(torch.nn.Module):
    """transformers' Kimi-K2.5 vision model and projector, as `Kimi_K25Model.get_image_features` chains them."""

    def __init__(self, config, state_dict: dict):
        super().__init__()
        from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25MultimodalProjection, Kimi_K25VisionModel

        vision = k25_vision_config(config)
        vision._attn_implementation = "sdpa"
        self.tower = Kimi_K25VisionModel(vision).eval()
        missing, unexpected = self.tower.load_state_dict(transformers_state_dict(state_dict, config), strict=False)
        # The time table is a non-persistent buffer transformers computes itself.
        assert not unexpected and not missing, (missing, unexpected)
        outer = types.SimpleNamespace(vision_config=vision, projection_hidden_size=config.hidden_size,
                                      projection_layer_norm_eps=config.layer_norm_eps,
                                      text_config=types.SimpleNamespace(hidden_size=config.text_hidden_size))
        self.projector = Kimi_K25MultimodalProjection(outer).eval()
        self.projector.load_state_dict({
            "pre_norm.weight": state_dict["mm_projector.pre_norm.weight"],
            "pre_norm.bias": state_dict["mm_projector.pre_norm.bias"],
            "in_proj.weight": state_dict["mm_projector.proj.0.weight"],
            "in_proj.bias": state_dict["mm_projector.proj.0.bias"],
            "out_proj.weight": state_dict["mm_projector.proj.2.weight"],
            "out_proj.bias": state_dict["mm_projector.proj.2.bias"]})

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, items: list[tuple[int, int, int]]) -> torch.Tensor:
        """Items grouped by t (transformers cannot batch different t), outputs back in item order."""
        starts = [0]
        for t, h, w in items:
            starts.append(starts[-1] + t * h * w)
        outputs: list[torch.Tensor | None] = [None] * len(items)
        for frames in sorted({t for t, _, _ in items}):
            group = [i for i, (t, _, _) in enumerate(items) if t == frames]
            pixels = torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in group])
            pooled = self.tower(pixels, torch.tensor([items[i] for i in group])).pooler_output
            projected = self.projector(pooled).flatten(0, 1)
            for i, out in zip(group, projected.split([items[i][1] * items[i][2] // 4 for i in group])):
                outputs[i] = out
        return torch.cat(outputs)


@pytest.fixture(scope="module")
def models():
    cfg = tiny_k25_config()
    ref = random_model(cfg, seed=60)
    fused = FusedMoonVit(cfg)
    fused.load_state_dict(ref.state_dict())
    return ref, fused.eval(), TransformersK25(cfg, ref.state_dict())


@pytest.mark.parametrize("item_set", sorted(ITEM_SETS))
def test_fp32_parity_with_transformers(models, item_set):
    ref, fused, theirs = models
    items = ITEM_SETS[item_set]
    pix = random_pixels(items, seed=sorted(ITEM_SETS).index(item_set) + 60)
    want = theirs(pix, items)
    assert want.shape == (sum(h * w // 4 for _, h, w in items), 24)
    for name, model in (("reference", ref), ("fused", fused)):
        got = model(pix, torch.tensor(items))
        assert got.shape == want.shape and torch.isfinite(got).all()
        err = rel_err(got, want)
        print(f"fp32 {item_set} {name}: ||ours - transformers|| / ||transformers|| = {err:.2e}")
        assert err <= 1e-5, name


def test_rope_permutation_is_transformers_layout():
    """Row 2j + r of a head moves to r * D/2 + j: (re, im) pairs become the two halves rotate_half pairs."""
    w = torch.arange(2 * 8, dtype=torch.float32)[:, None]  # 2 heads of 8
    got = rope_permuted(w, 2).flatten().tolist()
    assert got == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
