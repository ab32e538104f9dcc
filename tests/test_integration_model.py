"""`FusedKimiVLForConditionalGeneration` against the installed vLLM's (0.33.0 or 0.34.0) own
`KimiVLForConditionalGeneration`, on the CPU.

Both classes are built by vLLM's `initialize_model` from a tiny Kimi-VL config.json (2 vision layers, one
dense DeepseekV2 layer) and receive the same random weights through `load_weights` under the checkpoint's
names. The encoder CUDA-graph protocol is driven through vLLM's own `EncoderCudaGraphManager`, its own
capture included; only the CUDA graph itself is replaced, by a stand-in whose replay reruns the body the
manager ran under capture.
"""


import threading
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version

from moonvit_fixtures import random_model, random_pixels, tiny_config
from vllm_manager import captured_manager, poison
from vllm_peer import (MAX_MODEL_LEN, assert_matches, build, build_refusing_stock_tower, encoder_state, init_vllm_cpu,
                       vllm_config, write_tiny_kimi_vl_dir)

from fused_moonvit.integration.encoder_graph import PADDING_LOGICS, PLAN_KEY

pytestmark = pytest.mark.vllm

# vLLM 0.34's manager shares capture buffers across budgets and replays once per batch; 0.33's gives each
# budget its own buffers and packs a batch into several replays.
SHARED_BUFFERS = Version(version("vllm")) >= Version("0.34")

VISION = tiny_config()  # 2 layers, hidden 32, 4 heads, a 16x16 position table, text hidden 24
TEXT_HIDDEN = VISION.text_hidden_size

IMAGE_SETS = {
    "one": [(6, 10)],
    "several": [(2, 2), (6, 10), (16, 16), (20, 12)],
    "thin": [(2, 40), (40, 2)],
}


def mm_kwargs(grids, seed=0):
    return {"pixel_values": random_pixels(grids, seed=seed), "image_grid_hws": torch.tensor(grids)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_kimi_vl")
    write_tiny_kimi_vl_dir(directory, VISION, max_position_embeddings=MAX_MODEL_LEN)
    init_vllm_cpu()
    return directory


@pytest.fixture(scope="module")
def stock(model_dir, checkpoint):
    from vllm.model_executor.models.kimi_vl import KimiVLForConditionalGeneration

    return build(KimiVLForConditionalGeneration, model_dir, checkpoint)


@pytest.fixture(scope="module")
def checkpoint(model_dir):
    """Checkpoint-named random weights: the encoder's from `random_model` (whose state-dict keys are the
    checkpoint's), the text model's by the names vLLM's DeepseekV2 loader expects."""
    from vllm.model_executor.models.kimi_vl import KimiVLForConditionalGeneration

    tensors = dict(random_model(VISION, seed=3).state_dict())
    g = torch.Generator().manual_seed(4)
    shell = build(KimiVLForConditionalGeneration, model_dir)
    for name, p in shell.language_model.named_parameters(prefix="language_model"):
        t = torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5)
        if "gate_up_proj" in name:  # vLLM's fused parameter; the checkpoint holds the two halves
            gate, up = t.chunk(2)
            tensors[name.replace("gate_up_proj", "gate_proj")] = gate
            tensors[name.replace("gate_up_proj", "up_proj")] = up
        else:
            tensors[name] = t
    return tensors


@pytest.fixture(scope="module")
def ours(model_dir, checkpoint):
    from fused_moonvit.integration.kimi_vl import FusedKimiVLForConditionalGeneration

    return build(FusedKimiVLForConditionalGeneration, model_dir, checkpoint)


@pytest.fixture(scope="module")
def reference(stock):
    """Stock vLLM's per-image embeddings, per image set."""
    with torch.inference_mode():
        return {name: stock.embed_multimodal(**mm_kwargs(grids)) for name, grids in IMAGE_SETS.items()}


# -- construction --

def test_builds_fused_encoder_once(model_dir, checkpoint, monkeypatch):
    import fused_moonvit.integration.kimi_vl as integration
    from vllm.model_executor.models import kimi_vl as vllm_kimi_vl
    from vllm.model_executor.models import moonvit as vllm_moonvit

    model, built = build_refusing_stock_tower(
        monkeypatch, integration.FusedKimiVLForConditionalGeneration, model_dir, checkpoint,
        (vllm_moonvit.MoonVitPretrainedModel, vllm_kimi_vl.KimiVLMultiModalProjector))

    assert len(built) == 1
    assert model.fused_encoder is built[0]
    assert model.vision_tower is built[0].vision_tower
    assert model.multi_modal_projector is built[0].multi_modal_projector
    assert model._tower_model_names == ["vision_tower", "multi_modal_projector"]
    # The parent's constructor names are vLLM's again once ours is built.
    assert vllm_kimi_vl.MoonVitPretrainedModel is vllm_moonvit.MoonVitPretrainedModel
    # Every encoder parameter has exactly its checkpoint name, once (build() checked that load_weights
    # filled every parameter).
    state, encoder_keys = encoder_state(model, checkpoint)
    assert set(state) == encoder_keys
    assert len(list(model.vision_tower.parameters())) + len(list(model.multi_modal_projector.parameters())) \
        == len(encoder_keys)


def test_constructor_swap_is_local_to_the_model(model_dir, monkeypatch):
    """While ours is being built, vLLM's module still names its own tower classes, and a stock Kimi-VL
    built then, in another thread, gets vLLM's own MoonVit."""
    import fused_moonvit.integration.drop_in as drop_in
    import fused_moonvit.integration.kimi_vl as integration
    from vllm.model_executor.models import kimi_vl as vllm_kimi_vl
    from vllm.model_executor.models import moonvit as vllm_moonvit

    seen = {}

    class FusedMoonVitBuildingAStockModel(drop_in.FusedMoonVit):
        def __init__(self, config):
            super().__init__(config)
            seen["module_names"] = (vllm_kimi_vl.MoonVitPretrainedModel, vllm_kimi_vl.KimiVLMultiModalProjector)

            def build_stock():
                try:
                    seen["stock"] = build(vllm_kimi_vl.KimiVLForConditionalGeneration, model_dir)
                except BaseException as e:  # reported below, in the test's thread
                    seen["error"] = e

            thread = threading.Thread(target=build_stock)
            thread.start()
            thread.join()

    monkeypatch.setattr(drop_in, "FusedMoonVit", FusedMoonVitBuildingAStockModel)
    ours = build(integration.FusedKimiVLForConditionalGeneration, model_dir)

    assert "error" not in seen, seen.get("error")
    assert seen["module_names"] == (vllm_moonvit.MoonVitPretrainedModel, vllm_kimi_vl.KimiVLMultiModalProjector)
    stock = seen["stock"]
    assert type(stock.vision_tower) is vllm_moonvit.MoonVitPretrainedModel
    assert type(stock.multi_modal_projector) is vllm_kimi_vl.KimiVLMultiModalProjector
    assert isinstance(ours.fused_encoder, FusedMoonVitBuildingAStockModel)
    assert ours.vision_tower is ours.fused_encoder.vision_tower


def test_tower_constructors_refuse_what_they_cannot_build():
    """A quantization config for the tower (vLLM 0.33 and 0.34 pass none), or a prefix other than the
    attribute whose checkpoint names the encoder's parameters carry."""
    from fused_moonvit.integration.drop_in import FusedMoonVit, FusedTowerConstructors
    from fused_moonvit.moonvit.families import KIMI_VL

    constructors = FusedTowerConstructors(VISION, "model", KIMI_VL.vllm.tower_constructors,
                                          "KimiVLForConditionalGeneration", FusedMoonVit)
    vision_tower, projector = constructors.stand_in("vision_tower"), constructors.stand_in("multi_modal_projector")
    with pytest.raises(ValueError, match="unquantized vision weights only.*vision_tower quantized \\(object\\)"):
        vision_tower(None, prefix="model.vision_tower", quant_config=object())
    with pytest.raises(RuntimeError, match="multi_modal_projector under the prefix 'model.projector', not "
                                           "'model.multi_modal_projector'"):
        projector(config=None, prefix="model.projector")
    assert constructors.encoder is None and constructors.built == []
    tower = vision_tower(None, prefix="model.vision_tower", quant_config=None)
    assert tower is constructors.encoder.vision_tower and constructors.built == ["vision_tower"]
    with pytest.raises(KeyError, match="'mm_projector' is not one of"):
        constructors.stand_in("mm_projector")


def test_refuses_a_parent_that_builds_its_tower_otherwise(monkeypatch):
    from vllm.model_executor.models import kimi_vl as vllm_kimi_vl

    from fused_moonvit.integration.drop_in import FusedMoonVit, FusedTowerConstructors, parent_init_with
    from fused_moonvit.moonvit.families import KIMI_VL

    def init_without_the_names(self, vllm_config, prefix=""):
        self.vision_tower = None

    monkeypatch.setattr(vllm_kimi_vl.KimiVLForConditionalGeneration, "__init__", init_without_the_names)
    with pytest.raises(RuntimeError, match="no longer builds its tower through MoonVitPretrainedModel and "
                                           "KimiVLMultiModalProjector.*FUSED_MOONVIT_DISABLE=1"):
        parent_init_with(vllm_kimi_vl.KimiVLForConditionalGeneration,
                         FusedTowerConstructors(VISION, "", KIMI_VL.vllm.tower_constructors, "x", FusedMoonVit))


def test_load_weights_refuses_quantized_vision_tensors(model_dir, checkpoint):
    from fused_moonvit.integration.kimi_vl import FusedKimiVLForConditionalGeneration

    model = build(FusedKimiVLForConditionalGeneration, model_dir)
    quantized = dict(checkpoint)
    quantized["vision_tower.encoder.blocks.0.wqkv.weight_scale"] = torch.ones(1)
    with pytest.raises(ValueError, match="'vision_tower.encoder.blocks.0.wqkv.weight_scale'.*unquantized vision "
                                         "weights only"):
        model.load_weights(iter(quantized.items()))


def test_refuses_weight_sharded_encoder(model_dir):
    from vllm.config import ParallelConfig

    from fused_moonvit.integration.kimi_vl import FusedKimiVLForConditionalGeneration

    with pytest.raises(ValueError, match='mm_encoder_tp_mode="data"'):
        build(FusedKimiVLForConditionalGeneration, model_dir, parallel=ParallelConfig(tensor_parallel_size=2))


# -- eager path --

@pytest.mark.parametrize("image_set", sorted(IMAGE_SETS))
def test_embeddings_match_stock(ours, reference, image_set):
    with torch.inference_mode():
        got = ours.embed_multimodal(**mm_kwargs(IMAGE_SETS[image_set]))
    assert_matches(got, reference[image_set])


def test_data_parallel_mode_matches_stock(model_dir, checkpoint, reference):
    from fused_moonvit.integration.kimi_vl import FusedKimiVLForConditionalGeneration

    model = build(FusedKimiVLForConditionalGeneration, model_dir, checkpoint, mm_encoder_tp_mode="data")
    assert model.use_data_parallel
    with torch.inference_mode():
        got = model.embed_multimodal(**mm_kwargs(IMAGE_SETS["several"]))
    assert_matches(got, reference["several"])


# -- SupportsEncoderCudaGraph --

def test_protocol_config_and_item_specs(ours):
    from vllm.model_executor.models.interfaces import supports_encoder_cudagraph

    assert supports_encoder_cudagraph(ours)
    config = ours.get_encoder_cudagraph_config()
    assert config.modalities == ["image"]
    assert config.buffer_keys == ["pixel_values", PLAN_KEY]
    assert config.out_hidden_size == TEXT_HIDDEN
    # Both releases take the model's padding logics: the pixel buffer's padding rows are not cleared.
    assert config.padding_logics == PADDING_LOGICS
    specs = ours.get_encoder_cudagraph_item_specs(mm_kwargs(IMAGE_SETS["several"]))
    assert [(s.input_size, s.output_tokens) for s in specs] == [(h * w, h * w // 4) for h, w in IMAGE_SETS["several"]]


@pytest.mark.parametrize("token_budget,slots,dtype", [(16, 1, torch.float32), (64, 4, torch.float32),
                                                     (100, 7, torch.bfloat16)])
def test_capture_inputs(ours, token_budget, slots, dtype):
    from fused_moonvit.kernels.plan import plan_numel

    capture = ours.prepare_encoder_cudagraph_capture_inputs(token_budget, slots, slots, torch.device("cpu"), dtype)
    values = capture.values
    assert set(values) == set(ours.get_encoder_cudagraph_config().buffer_keys)
    # Budgets are output tokens at vLLM's boundary and patches inside.
    assert values["pixel_values"].shape == (4 * token_budget, 3, 14, 14)
    assert values["pixel_values"].dtype == dtype
    plan = values[PLAN_KEY]
    assert plan.dtype == torch.int32 and plan.shape == (plan_numel(slots),)
    # All padding: every slot empty, one padding sequence over the whole budget.
    assert plan[: slots + 2].tolist() == [0] * (slots + 1) + [4 * token_budget]
    if dtype == torch.float32:  # the manager captures in the model's dtype
        out = ours.encoder_cudagraph_forward(dict(values))
        assert out.shape == (token_budget, TEXT_HIDDEN) and torch.isfinite(out).all()


@pytest.mark.parametrize("image_set", sorted(IMAGE_SETS))
def test_replay_buffers_fit_capture_buffers(ours, image_set):

    grids = IMAGE_SETS[image_set]
    kwargs = mm_kwargs(grids)
    slots = 6
    capture = ours.prepare_encoder_cudagraph_capture_inputs(512, slots, slots, torch.device("cpu"), torch.float32)
    replay = ours.prepare_encoder_cudagraph_replay_buffers(kwargs, slots, slots)
    assert set(replay.values) == set(capture.values)
    assert replay.values["pixel_values"] is kwargs["pixel_values"]
    plan, captured_plan = replay.values[PLAN_KEY], capture.values[PLAN_KEY]
    assert plan.shape == captured_plan.shape and plan.dtype == captured_plan.dtype
    cu = [0]
    for h, w in grids:
        cu.append(cu[-1] + h * w)
    assert plan[: slots + 1].tolist() == cu + [cu[-1]] * (slots - len(grids))


def test_padding_cannot_produce_nan(ours, reference):
    """Whatever the captured buffer holds past the last image (here NaN), the padding rows stay finite
    and the images' rows are unchanged."""
    from fused_moonvit.kernels.plan import build_plan, plan_cu_seqlens

    grids = IMAGE_SETS["several"]
    kwargs = mm_kwargs(grids)
    capture = ours.prepare_encoder_cudagraph_capture_inputs(160, 8, 8, torch.device("cpu"), torch.float32)
    replay = ours.prepare_encoder_cudagraph_replay_buffers(kwargs, 8, 8)
    buffers = capture.values
    buffers["pixel_values"].fill_(float("nan"))
    buffers["pixel_values"][: kwargs["pixel_values"].shape[0]].copy_(replay.values["pixel_values"])
    buffers[PLAN_KEY].copy_(replay.values[PLAN_KEY])
    with torch.inference_mode():
        out = ours.encoder_cudagraph_forward(dict(buffers))
    # The forward ended the plan's trailing padding sequence at the budget, as the full plan would.
    assert torch.equal(buffers[PLAN_KEY], build_plan(grids, 640, 8))
    assert plan_cu_seqlens(buffers[PLAN_KEY])[-1].item() == 640
    assert out.shape == (160, TEXT_HIDDEN) and torch.isfinite(out).all()
    assert_matches(out[: sum(h * w // 4 for h, w in grids)].split([h * w // 4 for h, w in grids]),
                   reference["several"])


def test_protocol_signatures_are_inspected_once(ours, monkeypatch):
    import inspect

    import fused_moonvit.integration.drop_in as drop_in

    calls = []
    real = inspect.signature
    monkeypatch.setattr(drop_in.inspect, "signature", lambda f: calls.append(f) or real(f))
    drop_in.protocol_signature.cache_clear()
    kwargs = mm_kwargs(IMAGE_SETS["several"])
    for _ in range(3):
        ours.prepare_encoder_cudagraph_replay_buffers(kwargs, 6, 6)
        ours.encoder_eager_forward(kwargs)
    assert len(calls) == 2


def test_replay_validates_the_grid_once(ours, monkeypatch):
    from fused_moonvit.kernels.items import Items
    from fused_moonvit.moonvit import runner  # items_plan, the plan step replay_values shares

    plans, validated = [], []
    real = runner.build_plan
    monkeypatch.setattr(runner, "build_plan", lambda *a, **k: plans.append(a) or real(*a, **k))
    real_of = Items.of.__func__
    monkeypatch.setattr(Items, "of", classmethod(lambda cls, grid, *a, **k: (
        validated.append(grid) if not isinstance(grid, Items) else None) or real_of(cls, grid, *a, **k)))
    ours.prepare_encoder_cudagraph_replay_buffers(mm_kwargs(IMAGE_SETS["several"]), 6, 6)
    assert len(plans) == 1 and len(validated) == 1
    with pytest.raises(ValueError, match="item 1: h must be even"):
        ours.prepare_encoder_cudagraph_replay_buffers({"pixel_values": torch.zeros(19, 3, 14, 14),
                                                      "image_grid_hws": torch.tensor([[2, 2], [3, 5]])}, 6, 6)


def test_auto_budgets(ours, model_dir, monkeypatch):
    """Without user budgets, vLLM infers them from the model's range (in output tokens): 64 up to
    min(max_num_batched_tokens, max_model_len), in each release's steps."""
    from vllm.config import CompilationConfig

    config = vllm_config(model_dir, compilation=CompilationConfig(cudagraph_mm_encoder=True))
    manager, _ = captured_manager(ours, config, monkeypatch)
    expected = [64, 80, 96, 112, 128, 160, 192, 224, MAX_MODEL_LEN] if SHARED_BUFFERS else [64, 128, MAX_MODEL_LEN]
    assert manager.token_budgets == expected
    for budget in manager.token_budgets:
        graph = manager._get_graph_set("default")[budget]
        assert graph.input_buffers["pixel_values"].shape[0] == 4 * budget
        assert graph.output_buffer.shape == (budget, TEXT_HIDDEN)


def manager_config(model_dir):
    from vllm.config import CompilationConfig

    return vllm_config(model_dir, compilation=CompilationConfig(
        cudagraph_mm_encoder=True, encoder_cudagraph_token_budgets=[16, 32, 64],
        encoder_cudagraph_max_vision_items_per_batch=4))


# Each case: the images, then per release (0.33, 0.34) the budgets the manager replays and how many images
# run eagerly.
MANAGER_CASES = {
    # 1, 15 and 30 tokens: 0.33 splits off the 30 (16 + 32 < 64); 0.34 replays all 46 at 64
    "packed": ([(6, 10), (2, 2), (10, 12)], ([16, 32], 0), ([64], 0)),
    # one image that fills its budget exactly: no padding rows at all
    "exact_fit": ([(16, 16)], ([64], 0), ([64], 0)),
    # 73 tokens, above the largest budget: 0.33 runs the 72-token image eagerly, 0.34 the whole batch
    "oversized": ([(18, 16), (2, 2)], ([16], 1), ([], 2)),
    # more images than max_batch_size slots: 0.33 replays twice, 0.34 runs the batch eagerly
    "many": ([(4, 4)] * 5, ([16, 16], 0), ([], 5)),
}


@pytest.mark.parametrize("case", sorted(MANAGER_CASES))
@pytest.mark.parametrize("data_parallel", [False, True], ids=["local", "dp"])
def test_manager_execute_matches_stock(ours, stock, model_dir, case, data_parallel, monkeypatch):
    grids, *per_release = MANAGER_CASES[case]
    budgets, eager = per_release[SHARED_BUFFERS]
    manager, replays = captured_manager(ours, manager_config(model_dir), monkeypatch)
    # The manager's data-parallel path (load-balanced shard, then gather) at world size 1: it reorders
    # the images before selecting them.
    manager.use_dp = data_parallel
    kwargs = mm_kwargs(grids, seed=5)
    with torch.inference_mode():
        got = manager.execute(kwargs)
        want = stock.embed_multimodal(**kwargs)
    assert_matches(got, want)
    assert sorted(replays) == budgets
    assert (manager.graph_hits, manager.graph_misses) == (len(grids) - eager, eager)


# In this order through one manager: a small budget follows a larger one; then every captured buffer is
# poisoned (NaN pixels, a random plan) before each of the last two sets.
STALE_ROW_SETS = [
    ("largest_exact", [(16, 16)], [64]),
    ("small_after_large", [(2, 2), (4, 6)], [16]),  # 7 tokens: rows 28..63 of the 16 budget are padding
    ("after_poison", [(10, 12)], [32]),  # 30 tokens: 8 padding rows
    ("thin_after_poison", [(2, 40), (40, 2), (4, 4)], [64]),  # 44 tokens
]


@pytest.mark.parametrize("data_parallel", [False, True], ids=["local", "dp"])
def test_stale_rows_and_nan_in_captured_buffers(ours, stock, model_dir, data_parallel, monkeypatch):
    manager, replays = captured_manager(ours, manager_config(model_dir), monkeypatch)
    manager.use_dp = data_parallel
    graphs = manager._get_graph_set("default")
    shared = [graphs[b].input_buffers[key].data_ptr() == graphs[64].input_buffers[key].data_ptr()
              for b in (16, 32) for key in ("pixel_values", PLAN_KEY)]
    assert shared == [SHARED_BUFFERS] * 4
    for k, (name, grids, budgets) in enumerate(STALE_ROW_SETS):
        if name.endswith("after_poison"):
            poison(manager, seed=k)
        kwargs = mm_kwargs(grids, seed=10 + k)
        first = len(replays)
        with torch.inference_mode():
            got = manager.execute(kwargs)
            want = stock.embed_multimodal(**kwargs)
        assert_matches(got, want)
        assert replays[first:] == budgets, name
        if name == "small_after_large":
            # Padding rows are not cleared: on 0.34 they hold the previous set's pixels (the buffer is
            # shared with the 64 budget), on 0.33 the zeros of the 16 budget's own capture.
            padding = graphs[16].input_buffers["pixel_values"][28:]
            previous = mm_kwargs(STALE_ROW_SETS[0][1], seed=10)["pixel_values"][28:64]
            assert torch.equal(padding, previous if SHARED_BUFFERS else torch.zeros_like(previous))
    # The 32 budget's last padding rows, poisoned before the last set: on 0.34 that set (at 64) wrote
    # its pixels there through the shared buffer; on 0.33 they are the 32 budget's own, still NaN.
    rows = graphs[32].input_buffers["pixel_values"][120:128]
    if SHARED_BUFFERS:
        assert torch.equal(rows, kwargs["pixel_values"][120:128])
    else:
        assert rows.isnan().all()
