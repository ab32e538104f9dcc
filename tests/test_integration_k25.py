"""`FusedKimiK25ForConditionalGeneration` against the installed vLLM's own `KimiK25ForConditionalGeneration`,
on the CPU: images (t = 1) and video chunks (t = 2, 3, 4 frames), eagerly and through vLLM's own encoder
CUDA-graph manager.

Both classes are built by vLLM's `initialize_model` from a tiny Kimi-K2.5 config.json (a MoonViT3d of 2
layers with 4 time frames, one dense DeepseekV3 layer) and receive the same random weights through their
own `load_weights`, under the checkpoint's names (vLLM's renames its projector's `proj.0`/`proj.2`, ours
keeps them). A second directory adds a preprocessor config with a mean and std, so that both models take
raw uint8 pixels and normalise them on the device. The manager's capture runs as it is; only the CUDA
graph is a stand-in (tests/vllm_manager.py).

Skipped, as a whole, only where the installed vLLM has no Kimi-K2.5 model.
"""

from importlib.metadata import version

import pytest
import torch
from packaging.version import Version

try:
    import vllm.model_executor.models.kimi_k25  # noqa: F401
except ModuleNotFoundError as err:
    if err.name != "vllm.model_executor.models.kimi_k25":
        raise
    pytest.skip("this vLLM has no Kimi-K2.5 model (vllm.model_executor.models.kimi_k25)", allow_module_level=True)

from moonvit_fixtures import random_model, tiny_config
from vllm_manager import captured_manager, poison
from vllm_peer import (MAX_MODEL_LEN, assert_embeds_as_stock, assert_mapper_drops_only_projector_renames,
                       assert_matches, assert_normalises_raw_pixels_as_stock, build, build_refusing_stock_tower,
                       encoder_state, init_vllm_cpu, kimi_k25_config_json, stock_and_ours_fixtures, thw_mm_kwargs,
                       vllm_config, write_tiny_kimi_k25_dir)

from fused_moonvit.integration.encoder_graph import PADDING_LOGICS, PLAN_KEY

pytestmark = pytest.mark.vllm

SHARED_BUFFERS = Version(version("vllm")) >= Version("0.34")

VISION = tiny_config(tower="moonvit3d", pos_emb_time=4)  # 2 layers, hidden 32, 4 heads, 16x16 table, text 24
TEXT_HIDDEN = VISION.text_hidden_size
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
FRAMES = (1, 2, 4)

ITEM_SETS = {
    "images": [(1, 6, 10), (1, 2, 2), (1, 16, 16)],
    "chunk_t2": [(2, 6, 10)],
    "chunk_t3": [(3, 4, 4)],
    "chunk_t4": [(4, 8, 6)],
    "mix": [(1, 4, 6), (4, 6, 6), (2, 2, 2), (1, 10, 12), (3, 2, 8)],
    "non_square": [(1, 2, 40), (4, 40, 2), (2, 6, 20)],
}


@pytest.fixture(scope="module", autouse=True)
def stock_rope_without_triton():
    """vLLM's MoonViT3d rotates q and k with a Triton kernel whose `tl.interleave` the Triton interpreter
    cannot run; without Triton it takes its PyTorch path (the kernel's own reference, to an ulp). Only
    the stock peer's tower is affected: ours never builds it."""
    if not torch.cuda.is_available():
        from vllm.model_executor.models import kimi_k25_vit

        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(kimi_k25_vit, "HAS_TRITON", False)
            yield
    else:
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    init_vllm_cpu()
    return write_tiny_kimi_k25_dir(tmp_path_factory.mktemp("tiny_kimi_k25"), VISION, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    init_vllm_cpu()
    return write_tiny_kimi_k25_dir(tmp_path_factory.mktemp("tiny_kimi_k25_raw"), VISION, MAX_MODEL_LEN,
                                   image_mean=MEAN, image_std=STD)


def stock_class():
    from vllm.model_executor.models.kimi_k25 import KimiK25ForConditionalGeneration

    return KimiK25ForConditionalGeneration


def ours_class():
    from fused_moonvit.integration.kimi_k25 import FusedKimiK25ForConditionalGeneration

    return FusedKimiK25ForConditionalGeneration


@pytest.fixture(scope="module")
def checkpoint(model_dir):
    """Checkpoint-named random weights: the encoder's from `random_model` (whose state-dict keys are
    Kimi-K2.5's: `mm_projector.proj.0`, ...), the text model's by the names vLLM's DeepseekV2 loader takes."""
    tensors = dict(random_model(VISION, seed=3).state_dict())
    assert "mm_projector.proj.0.weight" in tensors
    g = torch.Generator().manual_seed(4)
    shell = build(stock_class(), model_dir)
    for name, p in shell.language_model.named_parameters(prefix="language_model"):
        t = torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5)
        if "gate_up_proj" in name:  # vLLM's fused parameter; the checkpoint holds the two halves
            gate, up = t.chunk(2)
            tensors[name.replace("gate_up_proj", "gate_proj")] = gate
            tensors[name.replace("gate_up_proj", "up_proj")] = up
        else:
            tensors[name] = t
    return tensors


stock, ours, reference = stock_and_ours_fixtures(stock_class, ours_class, ITEM_SETS)


# -- construction and weights --

def test_builds_fused_encoder_once(model_dir, checkpoint, stock, monkeypatch):
    import fused_moonvit.integration.kimi_k25 as integration
    from vllm.model_executor.layers.fusion.mm_input_norm import IdentityInputNorm
    from vllm.model_executor.models import kimi_k25 as vllm_kimi_k25
    from vllm.model_executor.models import kimi_k25_vit

    model, built = build_refusing_stock_tower(
        monkeypatch, integration.FusedKimiK25ForConditionalGeneration, model_dir, checkpoint,
        (kimi_k25_vit.MoonViT3dPretrainedModel, kimi_k25_vit.KimiK25MultiModalProjector))

    assert len(built) == 1
    encoder = model.fused_encoder
    assert encoder is built[0] and encoder.config.tower == "moonvit3d" and encoder.config.max_frames == 4
    assert model.vision_tower is encoder.vision_tower and model.mm_projector is encoder.mm_projector
    # Marked as the tower as vLLM's own are (the parent assigns each half twice: built, then moved).
    assert model._tower_model_names == stock._tower_model_names
    assert set(model._tower_model_names) == {"vision_tower", "mm_projector"}
    # vLLM's input normalisation (the identity here: no mean and std) sits where vLLM's tower keeps it.
    assert isinstance(model.vision_tower.patch_embed.input_norm, IdentityInputNorm)
    assert model.pixel_input_dtype is None
    # The parent's constructor names are vLLM's again once ours is built.
    assert vllm_kimi_k25.MoonViT3dPretrainedModel is kimi_k25_vit.MoonViT3dPretrainedModel
    # Every encoder parameter has exactly its checkpoint name, once (build() checked that load_weights
    # filled every parameter), and holds the checkpoint's tensor.
    state, encoder_keys = encoder_state(model, checkpoint)
    assert set(state) == encoder_keys
    assert all(torch.equal(state[k], checkpoint[k]) for k in encoder_keys)


def test_both_models_load_the_projector_from_the_checkpoint_names(ours, stock, checkpoint):
    assert torch.equal(ours.mm_projector.proj[0].weight, checkpoint["mm_projector.proj.0.weight"])
    assert torch.equal(stock.mm_projector.linear_1.weight, checkpoint["mm_projector.proj.0.weight"])
    assert torch.equal(ours.mm_projector.proj[2].bias, stock.mm_projector.linear_2.bias)


def test_weight_mapper_drops_only_the_projector_renames():
    assert_mapper_drops_only_projector_renames(
        ours_class(), stock_class(),
        kept=("mm_projector.proj.0.weight", "mm_projector.proj.2.bias", "vision_tower.patch_embed.proj.weight"),
        renamed=("mm_projector.proj.0.weight", "mm_projector.linear_1.weight"))


def test_loads_legacy_language_model_names(model_dir, checkpoint, ours):
    legacy = {k.replace("language_model.model.layers.", "language_model.layers."): v for k, v in checkpoint.items()}
    assert legacy != checkpoint
    model = build(ours_class(), model_dir, legacy)
    for (name, p), (_, q) in zip(model.named_parameters(), ours.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", ["mm_projector.linear_1.weight", "vision_tower.encoder.blocks.0.wqkv.weight_scale"])
def test_load_weights_refuses_unexpected_encoder_tensors(model_dir, checkpoint, name):
    model = build(ours_class(), model_dir)
    tensors = dict(checkpoint)
    tensors[name] = torch.ones(1)
    with pytest.raises(ValueError, match=f"'{name}', which the fused encoder does not have.*unquantized vision "
                                         "weights only"):
        model.load_weights(iter(tensors.items()))


# -- refusals --

def test_tower_constructors_refuse_what_they_cannot_build():
    from fused_moonvit.integration.drop_in import FusedMoonVit, FusedTowerConstructors
    from fused_moonvit.moonvit.families import KIMI_K25

    constructors = FusedTowerConstructors(VISION, "", KIMI_K25.vllm.tower_constructors, "KimiK25ForConditionalGeneration",
                                          FusedMoonVit)
    tower, projector = constructors.stand_in("vision_tower"), constructors.stand_in("mm_projector")
    with pytest.raises(ValueError, match=r"unquantized vision weights only.*vision_tower quantized \(object\)"):
        tower(None, quant_config=object(), input_norm=None, prefix="vision_tower")
    with pytest.raises(RuntimeError, match="KimiK25ForConditionalGeneration builds its mm_projector under the prefix "
                                           "'projector', not 'mm_projector'"):
        projector(config=None, out_hidden_size=TEXT_HIDDEN, prefix="projector")
    assert constructors.encoder is None and constructors.built == []
    norm = torch.nn.Identity()
    assert tower(None, quant_config=None, input_norm=norm, prefix="vision_tower") is constructors.encoder.vision_tower
    assert constructors.input_norm is norm and constructors.encoder.vision_tower.patch_embed.input_norm is norm


def test_refuses_weight_sharded_encoder(model_dir):
    from vllm.config import ParallelConfig

    with pytest.raises(ValueError, match='mm_encoder_tp_mode="data"'):
        build(ours_class(), model_dir, parallel=ParallelConfig(tensor_parallel_size=2))


def test_refuses_a_parent_that_builds_its_tower_otherwise(monkeypatch):
    from fused_moonvit.integration.drop_in import FusedMoonVit, FusedTowerConstructors, parent_init_with
    from fused_moonvit.moonvit.families import KIMI_K25

    def init_without_the_names(self, vllm_config, prefix=""):
        self.vision_tower = None

    monkeypatch.setattr(stock_class(), "__init__", init_without_the_names)
    constructors = FusedTowerConstructors(VISION, "", KIMI_K25.vllm.tower_constructors, "x", FusedMoonVit)
    with pytest.raises(RuntimeError, match="KimiK25ForConditionalGeneration.__init__ no longer builds its tower "
                                           "through MoonViT3dPretrainedModel and KimiK25MultiModalProjector"):
        parent_init_with(stock_class(), constructors)


def test_refuses_a_mapper_that_renames_encoder_parameters(model_dir, monkeypatch):
    import dataclasses

    cls = ours_class()
    mapper = cls.hf_to_vllm_mapper
    renaming = dataclasses.replace(mapper, orig_to_new_substr={**mapper.orig_to_new_substr, ".wqkv.": ".qkv."})
    monkeypatch.setattr(cls, "hf_to_vllm_mapper", renaming)
    with pytest.raises(RuntimeError, match=r"renames encoder parameters \(\['vision_tower.encoder.blocks.0.wqkv"):
        build(cls, model_dir)


def test_refuses_vision_names_that_disagree_with_vllms():
    from transformers import Kimi_K25Config

    from fused_moonvit.moonvit import MoonVitConfig
    from fused_moonvit.moonvit.families import KIMI_K25

    moonvit_config = KIMI_K25.moonvit_config

    config = kimi_k25_config_json(VISION)
    ours = moonvit_config(Kimi_K25Config(vision_config=config["vision_config"], text_config=config["text_config"]))
    assert {k: getattr(ours, k) for k in MoonVitConfig._FIELDS} == {k: getattr(VISION, k) for k in MoonVitConfig._FIELDS}
    config["vision_config"]["vt_num_hidden_layers"] = 3  # legacy name, read first by moonvit3d_fields
    with pytest.raises(ValueError, match="vision_config.num_hidden_layers=2, which vLLM's tower reads, "
                                         "disagrees with 3"):
        moonvit_config(Kimi_K25Config(vision_config=config["vision_config"], text_config=config["text_config"]))


# -- eager path --

@pytest.mark.parametrize("item_set", sorted(ITEM_SETS))
def test_embeddings_match_stock(ours, reference, item_set):
    assert_embeds_as_stock(ours, ITEM_SETS[item_set], reference[item_set], TEXT_HIDDEN)


@pytest.fixture(scope="module")
def raw_models(raw_dir, checkpoint):
    return build(stock_class(), raw_dir, checkpoint), build(ours_class(), raw_dir, checkpoint)


def test_raw_pixels_are_normalised_as_vllm_does(raw_models):
    from vllm.model_executor.layers.fusion.mm_input_norm import FusedMMInputNorm

    stock, ours = raw_models
    norm = ours.vision_tower.patch_embed.input_norm
    assert isinstance(norm, FusedMMInputNorm) and ours.pixel_input_dtype == torch.uint8
    assert torch.allclose(norm.bias, -torch.tensor(MEAN) / torch.tensor(STD))
    assert_normalises_raw_pixels_as_stock(stock, ours, ITEM_SETS["mix"])


def test_data_parallel_mode_matches_stock(model_dir, checkpoint, reference):
    model = build(ours_class(), model_dir, checkpoint, mm_encoder_tp_mode="data")
    assert model.use_data_parallel
    assert_embeds_as_stock(model, ITEM_SETS["mix"], reference["mix"], TEXT_HIDDEN)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_encode_data_parallel_across_ranks(monkeypatch, world):
    """Each rank encodes its share; after the all-gather every rank holds every item's h/2 * w/2 rows, in
    input order. Simulated ranks: the all-gather concatenates what each rank contributed (5 ranks for 4
    items leaves one without any)."""
    import vllm.distributed as distributed

    from fused_moonvit.integration.drop_in import encode_data_parallel

    items = [[4, 6, 6], [1, 2, 2], [2, 4, 8], [1, 10, 2]]
    sizes = [t * h * w for t, h, w in items]
    pixel_values = torch.cat([torch.full((n, 3, 14, 14), float(i)) for i, n in enumerate(sizes)])

    def encode(pixels, grid):  # item i's rows are all i: each output row names its item
        offsets = [0]
        for t, h, w in grid:
            offsets.append(offsets[-1] + t * h * w)
        return torch.cat([torch.full((h * w // 4, 5), pixels[offsets[j], 0, 0, 0].item())
                          for j, (_, h, w) in enumerate(grid)])

    contributions = {}

    def all_gather(local, dim=0):
        contributions[rank] = local
        return torch.cat([contributions.get(r, torch.full_like(local, float("nan"))) for r in range(world)])

    monkeypatch.setattr(distributed, "get_tensor_model_parallel_world_size", lambda: world)
    monkeypatch.setattr(distributed, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(distributed, "tensor_model_parallel_all_gather", all_gather)
    for rank in range(world):  # every rank contributes once, then every rank reads the gathered result
        encode_data_parallel(encode, pixel_values, items, 5, torch.float32)
    assert len({c.shape for c in contributions.values()}) == 1  # all_gather's one shape, padded
    for rank in range(world):
        out = encode_data_parallel(encode, pixel_values, items, 5, torch.float32)
        assert [o.shape for o in out] == [(h * w // 4, 5) for _, h, w in items]
        assert all((o == i).all() for i, o in enumerate(out)), rank


# -- SupportsEncoderCudaGraph --

def test_protocol_config_and_item_specs(ours):
    from vllm.model_executor.models.interfaces import supports_encoder_cudagraph

    assert supports_encoder_cudagraph(ours)
    config = ours.get_encoder_cudagraph_config()
    assert config.modalities == ["vision_chunk"]
    assert config.buffer_keys == ["pixel_values", PLAN_KEY]
    assert config.out_hidden_size == TEXT_HIDDEN
    assert config.padding_logics == PADDING_LOGICS
    assert config.capture_axes == (FRAMES,)
    # Every item, chunks too, in the graphs: its patches in, h/2 * w/2 tokens out (no eager sentinel).
    specs = ours.get_encoder_cudagraph_item_specs(thw_mm_kwargs(ITEM_SETS["mix"]))
    assert [(s.input_size, s.output_tokens) for s in specs] == [(t * h * w, h * w // 4) for t, h, w in ITEM_SETS["mix"]]


@pytest.mark.parametrize("indices,frames", [([0, 3], 1), ([1], 4), ([4, 0], 2), ([0, 1, 2, 3, 4], 2), ([], 1)])
def test_select_items_names_the_frame_factor(ours, indices, frames):
    from vllm.v1.worker.encoder_cudagraph_defs import ENCODER_CUDAGRAPH_AXIS_KEYS_KWARG as AXIS

    items = ITEM_SETS["mix"]  # (1, 4, 6), (4, 6, 6), (2, 2, 2), (1, 10, 12), (3, 2, 8)
    kwargs = thw_mm_kwargs(items)
    selected = ours.select_encoder_cudagraph_items(kwargs, indices)
    assert selected[AXIS] == (frames,)
    grid = selected["grid_thws"]
    assert grid.device.type == "cpu" and grid.dtype == torch.long and grid.tolist() == [list(items[i]) for i in indices]
    offsets = [0]
    for t, h, w in items:
        offsets.append(offsets[-1] + t * h * w)
    want = [kwargs["pixel_values"][offsets[i]:offsets[i + 1]] for i in indices]
    assert torch.equal(selected["pixel_values"], torch.cat(want) if want else kwargs["pixel_values"][:0])


@pytest.mark.parametrize("frames", FRAMES)
def test_capture_inputs(ours, raw_models, frames):
    from fused_moonvit.kernels.plan import plan_numel

    budget, slots = 16, 3
    capture = ours.prepare_encoder_cudagraph_capture_inputs(budget, slots, slots, torch.device("cpu"), torch.float32,
                                                            "default", (frames,))
    pixels, plan = capture.values["pixel_values"], capture.values[PLAN_KEY]
    assert pixels.shape == (4 * budget, frames, 3, 14, 14) and pixels.dtype == torch.float32
    assert plan.shape == (plan_numel(slots),) and plan[: slots + 2].tolist() == [0] * (slots + 1) + [4 * budget * frames]
    out = ours.encoder_cudagraph_forward(dict(capture.values))
    assert out.shape == (budget, TEXT_HIDDEN) and torch.isfinite(out).all()
    # A model fed raw pixels captures a uint8 pixel buffer, whatever dtype the manager asks for.
    raw = raw_models[1].prepare_encoder_cudagraph_capture_inputs(budget, slots, slots, torch.device("cpu"),
                                                                 torch.float32, "default", (frames,))
    assert raw.values["pixel_values"].dtype == torch.uint8
    with pytest.raises(ValueError, match=r"frame factor 3, not one of the model's \(1, 2, 4\)"):
        ours.prepare_encoder_cudagraph_capture_inputs(budget, slots, slots, torch.device("cpu"), torch.float32,
                                                      "default", (3,))


MANAGER_BUDGETS, MANAGER_SLOTS = [16, 32], 4


def manager_config(model_dir):
    from vllm.config import CompilationConfig

    return vllm_config(model_dir, compilation=CompilationConfig(
        cudagraph_mm_encoder=True, encoder_cudagraph_token_budgets=MANAGER_BUDGETS,
        encoder_cudagraph_max_vision_items_per_batch=MANAGER_SLOTS))


@pytest.fixture(scope="module")
def manager(ours, model_dir):
    """vLLM's manager over `ours`, captured once for the module (6 graphs: 2 budgets x 3 frame factors)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield captured_manager(ours, manager_config(model_dir), monkeypatch)


# Each case: the items, then per release (0.33, 0.34) the graphs the manager replays, (budget, (k,)),
# and how many items run eagerly. Both releases put these in one batch when they fit.
MANAGER_CASES = {
    # 16 tokens of images: k = 1
    "images": ([(1, 6, 10), (1, 2, 2)], ([(16, (1,))], 0), ([(16, (1,))], 0)),
    # one 4-frame chunk, 9 tokens: k = 4
    "chunk": ([(4, 6, 6)], ([(16, (4,))], 0), ([(16, (4,))], 0)),
    # 20 tokens, 224 patches over 80 positions: k = 4
    "mix": ([(1, 4, 6), (2, 2, 2), (4, 6, 6), (3, 2, 8)], ([(32, (4,))], 0), ([(32, (4,))], 0)),
    # 17 tokens, 3 frames: k = 4
    "three_frames": ([(3, 6, 10), (1, 2, 2), (3, 2, 2)], ([(32, (4,))], 0), ([(32, (4,))], 0)),
    # 64 tokens, above the largest budget: eager in both
    "oversized": ([(1, 16, 16)], ([], 1), ([], 1)),
    # more items than slots: 0.33 replays twice (4 items, then 1), 0.34 runs them eagerly
    "many": ([(2, 2, 2)] * 5, ([(16, (2,)), (16, (2,))], 0), ([], 5)),
}


@pytest.mark.parametrize("case", sorted(MANAGER_CASES))
@pytest.mark.parametrize("data_parallel", [False, True], ids=["local", "dp"])
def test_manager_execute_matches_stock(manager, stock, case, data_parallel):
    manager, replays = manager
    items, *per_release = MANAGER_CASES[case]
    graphs, eager = per_release[SHARED_BUFFERS]
    manager.use_dp = data_parallel  # its load-balanced shard and gather, at world size 1
    kwargs = thw_mm_kwargs(items, seed=5)
    first, (hits, misses) = len(replays), (manager.graph_hits, manager.graph_misses)
    try:
        with torch.inference_mode():
            got = manager.execute(kwargs)
            want = stock.embed_multimodal(**kwargs)
    finally:
        manager.use_dp = False
    assert_matches(got, want)
    assert replays[first:] == graphs
    assert (manager.graph_hits - hits, manager.graph_misses - misses) == (len(items) - eager, eager)


# In this order through one manager, whose every captured buffer is poisoned (NaN pixels, a random plan)
# first: a small budget after a larger one of the same frame factor; then poisoned again before each of
# the last two sets.
STALE_ROW_SETS = [
    ("chunk_exact", [(4, 8, 16)], [(32, (4,))]),  # 32 tokens, 512 patches: no padding rows
    ("small_after_chunk", [(4, 2, 2), (4, 4, 6)], [(16, (4,))]),  # 112 of the (16, 4) graph's 256 rows
    ("after_poison", [(2, 6, 10)], [(16, (2,))]),  # 120 of 128 rows
    ("mix_after_poison", [(1, 2, 40), (3, 4, 4), (1, 4, 4)], [(32, (2,))]),  # 28 tokens, 144 of 256 rows
]


def test_stale_rows_and_nan_in_captured_buffers(manager, stock):
    manager, replays = manager
    graphs = manager._get_graph_set("default")
    assert sorted(graphs) == sorted((b, (k,)) for b in MANAGER_BUDGETS for k in FRAMES)
    shared = [graphs[16, (k,)].input_buffers[key].data_ptr() == graphs[32, (k,)].input_buffers[key].data_ptr()
              for k in FRAMES for key in ("pixel_values", PLAN_KEY)]
    assert shared == [SHARED_BUFFERS] * 6
    for k, (name, items, expected) in enumerate(STALE_ROW_SETS):
        if k == 0 or name.endswith("after_poison"):
            poison(manager, seed=k)
        kwargs = thw_mm_kwargs(items, seed=10 + k)
        first = len(replays)
        with torch.inference_mode():
            got = manager.execute(kwargs)
            want = stock.embed_multimodal(**kwargs)
        assert_matches(got, want)
        assert replays[first:] == expected, name
        if name == "small_after_chunk":
            # Padding rows are not cleared: on 0.34 they hold the chunk's pixels (the buffer is shared
            # with the (32, 4) graph's), on 0.33 the (16, 4) graph's own poison.
            padding = graphs[16, (4,)].input_buffers["pixel_values"].view(-1, 3, 14, 14)[112:]
            previous = thw_mm_kwargs(STALE_ROW_SETS[0][1], seed=10)["pixel_values"][112:256]
            assert torch.equal(padding, previous) if SHARED_BUFFERS else padding.isnan().all()


def test_manager_with_raw_pixels_matches_stock(raw_models, raw_dir, monkeypatch):
    """uint8 pixels straight into the graph's uint8 buffer, normalised inside the graph; stale rows
    filled with 255 first."""
    stock, ours = raw_models
    manager, replays = captured_manager(ours, manager_config(raw_dir), monkeypatch)
    for graph in manager._get_graph_set("default").values():
        assert graph.input_buffers["pixel_values"].dtype == torch.uint8
        graph.input_buffers["pixel_values"].fill_(255)
    for k, items in enumerate([[(1, 4, 6), (4, 6, 6), (2, 2, 2)], [(2, 6, 10)], [(1, 6, 10), (1, 2, 2)]]):
        kwargs = thw_mm_kwargs(items, seed=20 + k, raw=True)
        with torch.inference_mode():
            got = manager.execute(kwargs)
            want = stock.embed_multimodal(**kwargs)
        assert_matches(got, want)
    assert replays == [(16, (4,)), (16, (2,)), (16, (1,))] and manager.graph_misses == 0
