"""`FusedKimiK3ForConditionalGeneration` against the installed vLLM's own `KimiK3ForConditionalGeneration`
(registered as Kimi-K3 and, from vLLM 0.34, Kimi-K3.1), on the CPU: images and video chunks, eagerly and
through vLLM's own encoder CUDA-graph manager.

Both classes are built by vLLM's `initialize_model` from a tiny Kimi-K3 config.json (a MoonViT3d of 2
layers with K3's options: RMSNorm, no biases, a qkv wider than the hidden size, a bilinear table, the
`patchmergerv2` projector) and receive the same random weights through their own `load_weights`, under
the checkpoint's names. K3's language model (KimiLinear) cannot be built on a CPU, so for both classes
vLLM's `init_vllm_registered_model` builds a stand-in (`vllm_peer.KimiK3LanguageStandIn`); the vision
tower and projector are what is compared. The manager's capture runs as it is; only the CUDA graph is a
stand-in (tests/vllm_manager.py).

Skipped, as a whole, only where the installed vLLM has no Kimi-K3 model (test_integration_plugin.py then
shows that the plugin leaves the name alone).
"""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("vllm.models.kimi_k3") is None:
    pytest.skip("this vLLM has no Kimi-K3 model (vllm.models.kimi_k3)", allow_module_level=True)

from moonvit_fixtures import K3_OPTIONS, random_model, tiny_k25_config
from vllm_manager import captured_manager, poison
from vllm_peer import (KimiK3LanguageStandIn, assert_embeds_as_stock, assert_mapper_drops_only_projector_renames,
                       assert_matches, assert_normalises_raw_pixels_as_stock, build, build_refusing_stock_tower,
                       encoder_state, init_vllm_cpu, kimi_k3_config_json, stock_and_ours_fixtures, thw_mm_kwargs,
                       vllm_config, write_tiny_kimi_k3_dir)

from fused_moonvit.integration.encoder_graph import PADDING_LOGICS, PLAN_KEY
from fused_moonvit.moonvit import MoonVitConfig

pytestmark = pytest.mark.vllm

VISION = tiny_k25_config(**K3_OPTIONS)  # 2 layers, hidden 32, 4 heads of 16 (qkv 64), 4 frames, text 24
TEXT_HIDDEN = VISION.text_hidden_size
FRAMES = (1, 2, 4)

ITEM_SETS = {
    "images": [(1, 6, 10), (1, 2, 2), (1, 16, 16)],
    "chunk_t2": [(2, 6, 10)],
    "chunk_t4": [(4, 8, 6)],
    "mix": [(1, 4, 6), (4, 6, 6), (2, 2, 2), (1, 10, 12), (3, 2, 8)],
    "non_square": [(1, 2, 40), (4, 40, 2)],
}


MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.3, 0.28]


def stock_class():
    from vllm.models.kimi_k3 import KimiK3ForConditionalGeneration

    return KimiK3ForConditionalGeneration


def ours_class():
    from fused_moonvit.integration.kimi_k3 import FusedKimiK3ForConditionalGeneration

    return FusedKimiK3ForConditionalGeneration


@pytest.fixture(scope="module", autouse=True)
def cpu_stand_ins():
    """K3's language model is the stand-in, for both classes (their `__init__` builds it through this
    name of the stock class's module). Without a GPU, vLLM's MoonViT3d rotates q and k with PyTorch:
    its Triton kernel's `tl.interleave` does not run under the interpreter (only the stock tower)."""
    import inspect

    from vllm.model_executor.models import kimi_k25_vit

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(inspect.getmodule(stock_class()), "init_vllm_registered_model", KimiK3LanguageStandIn)
        if not torch.cuda.is_available():
            monkeypatch.setattr(kimi_k25_vit, "HAS_TRITON", False)
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    init_vllm_cpu()
    return write_tiny_kimi_k3_dir(tmp_path_factory.mktemp("tiny_kimi_k3"), VISION)


@pytest.fixture(scope="module")
def checkpoint():
    """Checkpoint-named random weights: the encoder's (`mm_projector.proj.0`, `proj.2`, `post_norm`), and
    the language model stand-in's."""
    tensors = dict(random_model(VISION, seed=23).state_dict())
    tensors["language_model.stand_in.weight"] = torch.randn(4, TEXT_HIDDEN, generator=torch.Generator().manual_seed(2))
    return tensors


stock, ours, reference = stock_and_ours_fixtures(stock_class, ours_class, ITEM_SETS)


# -- construction and weights --

def test_tower_and_projector_from_the_checkpoint_names_and_k3_vision_config(model_dir, checkpoint, stock,
                                                                             monkeypatch):
    from vllm.model_executor.models import kimi_k25_vit

    from fused_moonvit.moonvit.modules import PatchMergerV2

    model, built = build_refusing_stock_tower(
        monkeypatch, ours_class(), model_dir, checkpoint,
        (kimi_k25_vit.MoonViT3dPretrainedModel, kimi_k25_vit.KimiK25MultiModalProjector))
    assert len(built) == 1 and model.fused_encoder is built[0]
    config = model.fused_encoder.config
    # K3's vision_config (vt_* names, K3's options) read into the tiny tower's every field.
    assert {k: getattr(config, k) for k in MoonVitConfig._FIELDS} == {k: getattr(VISION, k) for k in MoonVitConfig._FIELDS}
    assert type(model.mm_projector) is PatchMergerV2 and model.mm_projector.proj[0].bias is None
    assert model.vision_tower is model.fused_encoder.vision_tower
    assert model._tower_model_names == stock._tower_model_names
    # Every encoder parameter under its checkpoint name, once, holding the checkpoint's tensor; stock
    # vLLM renames the projector's linears.
    state, encoder_keys = encoder_state(model, checkpoint)
    assert set(state) == encoder_keys and "mm_projector.post_norm.weight" in state
    assert all(torch.equal(state[k], checkpoint[k]) for k in encoder_keys)
    assert torch.equal(stock.mm_projector.linear_1.weight, checkpoint["mm_projector.proj.0.weight"])


def test_weight_mapper_drops_only_the_projector_renames():
    assert_mapper_drops_only_projector_renames(
        ours_class(), stock_class(),
        kept=("mm_projector.proj.0.weight", "mm_projector.proj.2.weight", "mm_projector.post_norm.weight"),
        renamed=("mm_projector.proj.2.weight", "mm_projector.linear_2.weight"))


def test_what_init_reads_of_the_tower_is_answered_truthfully(model_dir, stock, monkeypatch):
    """K3's `__init__` reads `vision_tower.encoder.blocks[0].attn` to decide whether to warm up vLLM's
    FlashAttention-4 kernels for its tower; ours runs none of vLLM's attention backends, and says so, with
    the heads and head size of vLLM's own tower."""
    import fused_moonvit.integration.drop_in as drop_in

    reads = []

    class Recording(drop_in.EncoderAttentionFacts):
        def __getattribute__(self, name):
            reads.append(name)
            return super().__getattribute__(name)

    monkeypatch.setattr(drop_in, "EncoderAttentionFacts", Recording)
    model = build(ours_class(), model_dir)
    assert "is_flash_attn_backend" in reads
    facts, vllm_attn = model.vision_tower.encoder.blocks[0].attn, stock.vision_tower.encoder.blocks[0].attn
    assert (facts.num_heads, facts.head_size) == (vllm_attn.num_heads, vllm_attn.head_size) == (4, 16)
    assert facts.is_flash_attn_backend is False
    # Not a module: no parameters, no second name for anything.
    assert not any(".attn." in name for name, _ in model.named_parameters())


def test_refuses_vision_names_that_disagree_with_vllms():
    from vllm.transformers_utils.configs.kimi_k3 import KimiK3Config

    from fused_moonvit.moonvit.families import KIMI_K3

    hf_config = KimiK3Config(**{k: v for k, v in kimi_k3_config_json(VISION).items() if k.endswith("_config")})
    assert KIMI_K3.moonvit_config(hf_config).qkv_hidden_size == VISION.qkv_hidden_size
    hf_config.vision_config.num_attention_heads = 2  # vLLM's tower reads this name; K3's checkpoint names vt_*
    with pytest.raises(ValueError, match="vision_config.num_attention_heads=2, which vLLM's tower reads, "
                                         "disagrees with 4"):
        KIMI_K3.moonvit_config(hf_config)


# -- eager path --

@pytest.mark.parametrize("item_set", sorted(ITEM_SETS))
def test_embeddings_match_stock(ours, reference, item_set):
    assert_embeds_as_stock(ours, ITEM_SETS[item_set], reference[item_set], TEXT_HIDDEN)


def test_raw_pixels_are_normalised_as_vllm_does(tmp_path_factory, checkpoint):
    """K3 takes raw uint8 pixels where the checkpoint gives a mean and std (vLLM normalises them on the
    device); ours applies vLLM's normalisation module before the fused encoder."""
    raw_dir = write_tiny_kimi_k3_dir(tmp_path_factory.mktemp("tiny_kimi_k3_raw"), VISION, image_mean=MEAN,
                                     image_std=STD)
    stock, ours = build(stock_class(), raw_dir, checkpoint), build(ours_class(), raw_dir, checkpoint)
    assert ours.pixel_input_dtype == torch.uint8
    assert_normalises_raw_pixels_as_stock(stock, ours, ITEM_SETS["mix"])


def test_data_parallel_mode_matches_stock(model_dir, checkpoint, reference):
    model = build(ours_class(), model_dir, checkpoint, mm_encoder_tp_mode="data")
    assert model.use_data_parallel
    assert_embeds_as_stock(model, ITEM_SETS["mix"], reference["mix"], TEXT_HIDDEN)


# -- SupportsEncoderCudaGraph, through vLLM's own manager --

def test_protocol_config(ours):
    config = ours.get_encoder_cudagraph_config()
    assert config.modalities == ["image"]  # K3's processor registers images
    assert config.buffer_keys == ["pixel_values", PLAN_KEY] and config.padding_logics == PADDING_LOGICS
    assert config.out_hidden_size == TEXT_HIDDEN
    specs = ours.get_encoder_cudagraph_item_specs(thw_mm_kwargs(ITEM_SETS["mix"]))
    assert [(s.input_size, s.output_tokens) for s in specs] == [(t * h * w, h * w // 4) for t, h, w in ITEM_SETS["mix"]]


MANAGER_BUDGETS, MANAGER_SLOTS = [16, 32], 4


@pytest.fixture(scope="module")
def manager(ours, model_dir):
    from vllm.config import CompilationConfig

    config = vllm_config(model_dir, compilation=CompilationConfig(
        cudagraph_mm_encoder=True, encoder_cudagraph_token_budgets=MANAGER_BUDGETS,
        encoder_cudagraph_max_vision_items_per_batch=MANAGER_SLOTS))
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield captured_manager(ours, config, monkeypatch)


# Replayed in this order through one manager, every captured buffer poisoned (NaN pixels, a random plan)
# before each: images at the small budget, a chunk filling the large one, a smaller batch after it (the
# chunk's rows stay behind as padding), and images and chunks together.
POISONED_SETS = [
    [(1, 6, 10), (1, 2, 2)],
    [(4, 8, 16)],
    [(4, 2, 2), (4, 4, 6)],
    [(1, 2, 40), (3, 4, 4), (1, 4, 4)],
]


@pytest.mark.parametrize("data_parallel", [False, True], ids=["local", "dp"])
def test_manager_with_poisoned_buffers_matches_stock(manager, stock, data_parallel):
    manager, replays = manager
    graphs = manager._get_graph_set("default")
    assert sorted(graphs) == sorted((b, (k,)) for b in MANAGER_BUDGETS for k in FRAMES)
    manager.use_dp = data_parallel  # its load-balanced shard and gather, at world size 1
    try:
        for k, items in enumerate(POISONED_SETS):
            poison(manager, seed=k)
            kwargs = thw_mm_kwargs(items, seed=40 + k)
            first, hits = len(replays), manager.graph_hits
            with torch.inference_mode():
                got = manager.execute(kwargs)
                want = stock.embed_multimodal(**kwargs)
            assert_matches(got, want)
            assert len(replays) > first and manager.graph_hits - hits == len(items), items
    finally:
        manager.use_dp = False
