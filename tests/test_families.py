"""Each model family built from its declaration alone (`moonvit/families.py`): its config.json read into
a config of that family, the modules' projector and checkpoint names, its benchmark configuration, and
(with vLLM) the vLLM class and drop-in its declaration names."""

import importlib
import json

import pytest
import torch

from fused_moonvit.moonvit import MoonVitConfig, build_model
from fused_moonvit.moonvit.checkpoint import PROJECTOR_PREFIXES
from fused_moonvit.moonvit.families import FAMILIES, family_of, vllm_architectures
from fused_moonvit.moonvit.modules import MoonVitModules

# Each family's vision_config as its checkpoints spell it, at tiny sizes.
VISION_CONFIGS = {
    "kimi-vl": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                    init_pos_emb_height=8, init_pos_emb_width=8, merge_kernel_size=[2, 2]),
    "kimi-k25": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                     pos_emb_height=8, pos_emb_width=8, pos_emb_time=4, merge_type="sd2_tpool",
                     mm_projector_type="patchmerger"),
    "kimi-k3": dict(vt_num_hidden_layers=1, vt_hidden_size=32, vt_num_attention_heads=4, vt_intermediate_size=48,
                    init_pos_emb_height=8, init_pos_emb_width=8, init_pos_emb_time=4, qkv_hidden_size=64,
                    norm_type="rmsnorm", attn_bias=False, linear_bias=False, patch_embed_proj_bias=False,
                    pos_emb_interpolation_mode="bilinear", mm_projector_type="patchmergerv2"),
}


def test_every_family_is_declared_here():
    assert sorted(FAMILIES) == sorted(VISION_CONFIGS)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_from_its_declaration(name, tmp_path):
    family = FAMILIES[name]
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": family.model_types[0], "vision_config": VISION_CONFIGS[name],
        "text_config": {"hidden_size": 24}}))
    config = MoonVitConfig.from_pretrained(tmp_path)
    assert family_of(config) is family
    assert (config.tower, config.projector_type, config.projector_name) == (
        family.tower, family.projector_type, family.projector_name)
    assert config.hidden_size == 32 and config.text_hidden_size == 24
    with torch.device("meta"):
        modules = MoonVitModules(config)
    assert type(modules.projector) is family.projector
    projector_keys = {k for k in modules.state_dict() if not k.startswith("vision_tower.")}
    assert projector_keys and all(k.startswith(f"{family.projector_name}.") for k in projector_keys)
    assert f"{family.projector_name}." in PROJECTOR_PREFIXES
    # The benchmark configuration is a config of this family at the real model's sizes.
    real = MoonVitConfig(**family.benchmark)
    assert family_of(real) is family and real.num_hidden_layers == 27


def test_no_family_for_kimi_vls_tower_with_k3s_projector():
    with pytest.raises(ValueError, match="has the 'patchmerger' projector only"):
        MoonVitConfig(projector_type="patchmergerv2")


@pytest.mark.vllm
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vllm_declaration_names_the_installed_class(name):
    """Where the installed vLLM registers a family's architecture: the declared module and class are the
    registry's, its `__init__` builds the tower through the declared constructors, its eager hook exists,
    and the declared drop-in is that class's subclass of this family."""
    from vllm import ModelRegistry

    family = FAMILIES[name]
    known = set(ModelRegistry.get_supported_archs())
    archs = [arch for arch in family.vllm.architectures if arch in known]
    if not archs:  # a family this vLLM does not have: the plugin leaves it alone (test_integration_plugin)
        assert all(vllm_architectures()[arch] is family for arch in family.vllm.architectures)
        return
    stock = getattr(importlib.import_module(family.vllm.module), family.vllm.class_name)
    module, cls_name = family.vllm.drop_in.split(":")
    ours = getattr(importlib.import_module(module), cls_name)
    assert ours.family is family and ours.vllm_class is stock and issubclass(ours, stock)
    assert set(family.vllm.tower_constructors) <= set(stock.__init__.__code__.co_names)
    assert callable(getattr(stock, family.vllm.eager_hook))
    assert getattr(ours, family.vllm.eager_hook) is not getattr(stock, family.vllm.eager_hook)
    for arch in archs:
        assert vllm_architectures()[arch] is family
        assert ModelRegistry._try_load_model_cls(arch) is stock  # the plugin is not loaded in this process


# --- build_model's family: random weights of a family's real-size architecture ------------------------------

def test_build_model_family_without_a_directory():
    from fused_moonvit.moonvit.config import moonvit3d_fields

    with torch.device("meta"):  # the real sizes, laid out without memory
        default = build_model(MoonVitModules, device="meta")
        k25 = build_model(MoonVitModules, None, family="kimi-k25", device="meta")
        k3 = build_model(MoonVitModules, family="kimi-k3", device="meta")
    # Independently of the declarations: Kimi-VL-A3B's vision config, and Kimi-K2.5's (vLLM's MoonViT3d
    # defaults, a 7168-wide text model).
    assert default.config.to_dict() == MoonVitConfig().to_dict()
    assert k25.config.to_dict() == MoonVitConfig(**moonvit3d_fields({}), text_hidden_size=7168).to_dict()
    assert family_of(k3.config) is FAMILIES["kimi-k3"] and k3.config.norm_type == "rmsnorm"


def test_build_model_family_checks_the_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "kimi_k25", "vision_config": VISION_CONFIGS["kimi-k25"], "text_config": {"hidden_size": 24}}))
    with pytest.raises(ValueError, match=f"{tmp_path} holds a Kimi-K2.5 / K2.6 model \\(its config.json\\), not "
                                         f"family 'kimi-k3' \\(Kimi-K3 / K3.1\\)"):
        build_model(MoonVitModules, tmp_path, family="kimi-k3")


def test_build_model_family_mistakes():
    with pytest.raises(ValueError, match="unknown model family 'kimi-k2.5'; the families are 'kimi-vl' \\(Kimi-VL\\), "
                                         "'kimi-k25' \\(Kimi-K2.5 / K2.6\\), 'kimi-k3' \\(Kimi-K3 / K3.1\\)"):
        build_model(MoonVitModules, family="kimi-k2.5")
    with pytest.raises(ValueError, match="give family='kimi-k25' or config, not both"):
        build_model(MoonVitModules, family="kimi-k25", config=MoonVitConfig())
