"""`FusedKimiVLForConditionalGeneration` against vLLM 0.33.0's own `KimiVLForConditionalGeneration`, on the CPU.

Both classes are built by vLLM's `initialize_model` from a tiny Kimi-VL config.json (2 vision layers, one
dense DeepseekV2 layer) and receive the same random weights through `load_weights` under the checkpoint's
names. The encoder CUDA-graph protocol is driven through vLLM's own `EncoderCudaGraphManager`; only the
graph itself is replaced, by a rerun of the recorded forward on the recorded buffers.
"""


import pytest
import torch

from moonvit_fixtures import random_model, random_pixels, rel_err, tiny_config
from vllm_peer import init_vllm_cpu, write_tiny_kimi_vl_dir

pytestmark = pytest.mark.vllm

VISION = tiny_config()  # 2 layers, hidden 32, 4 heads, a 16x16 position table, text hidden 24
TEXT_HIDDEN = VISION.text_hidden_size
MAX_MODEL_LEN = 256

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


def vllm_config(model_dir, *, compilation=None, parallel=None, **model_kwargs):
    from vllm.config import ModelConfig, VllmConfig

    model_config = ModelConfig(model=str(model_dir), dtype="float32", skip_tokenizer_init=True,
                               max_model_len=MAX_MODEL_LEN, enforce_eager=True, **model_kwargs)
    extra = {k: v for k, v in (("compilation_config", compilation), ("parallel_config", parallel)) if v is not None}
    return VllmConfig(model_config=model_config, **extra)


def build(model_class, model_dir, checkpoint=None, **model_kwargs):
    """One model, in its own VllmConfig (vLLM registers attention layers per config), with `checkpoint`
    loaded through the model's own `load_weights`."""
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading

    config = vllm_config(model_dir, **model_kwargs)
    model = initialize_model(config, model_class=model_class)
    if checkpoint is not None:
        loaded = model.load_weights(iter(checkpoint.items()))
        assert loaded == {name for name, _ in model.named_parameters()}
        process_weights_after_loading(model, config.model_config, torch.device("cpu"))
    return model.eval()


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


def assert_matches(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.isfinite(g).all()
        assert rel_err(g, w) <= tol


# -- construction --

def test_builds_fused_encoder_once(model_dir, checkpoint, monkeypatch):
    import fused_moonvit.integration.kimi_vl as integration
    from vllm.model_executor.models import kimi_vl as vllm_kimi_vl
    from vllm.model_executor.models import moonvit as vllm_moonvit

    def refuse(*args, **kwargs):
        raise AssertionError("vLLM's own vision tower was built")

    monkeypatch.setattr(vllm_moonvit.MoonVitPretrainedModel, "__init__", refuse)
    monkeypatch.setattr(vllm_kimi_vl.KimiVLMultiModalProjector, "__init__", refuse)
    built = []

    class CountingFusedMoonVit(integration.FusedMoonVit):
        def __init__(self, config):
            built.append(self)
            super().__init__(config)

    monkeypatch.setattr(integration, "FusedMoonVit", CountingFusedMoonVit)
    model = build(integration.FusedKimiVLForConditionalGeneration, model_dir, checkpoint)

    assert len(built) == 1
    assert model.fused_encoder is built[0]
    assert model.vision_tower is built[0].vision_tower
    assert model.multi_modal_projector is built[0].multi_modal_projector
    assert model._tower_model_names == ["vision_tower", "multi_modal_projector"]
    # The parent's constructor names are vLLM's again once ours is built.
    assert vllm_kimi_vl.MoonVitPretrainedModel is vllm_moonvit.MoonVitPretrainedModel
    # Every encoder parameter has exactly its checkpoint name, once (build() checked that load_weights
    # filled every parameter).
    encoder_keys = {k for k in checkpoint if not k.startswith("language_model.")}
    assert {k for k in model.state_dict() if not k.startswith("language_model.")} == encoder_keys
    assert len(list(model.vision_tower.parameters())) + len(list(model.multi_modal_projector.parameters())) \
        == len(encoder_keys)


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

    from fused_moonvit.integration.kimi_vl import PLAN_KEY

    assert supports_encoder_cudagraph(ours)
    config = ours.get_encoder_cudagraph_config()
    assert config.modalities == ["image"]
    assert config.buffer_keys == ["pixel_values", PLAN_KEY]
    assert config.out_hidden_size == TEXT_HIDDEN
    specs = ours.get_encoder_cudagraph_item_specs(mm_kwargs(IMAGE_SETS["several"]))
    assert [(s.input_size, s.output_tokens) for s in specs] == [(h * w, h * w // 4) for h, w in IMAGE_SETS["several"]]


@pytest.mark.parametrize("token_budget,slots,dtype", [(16, 1, torch.float32), (64, 4, torch.float32),
                                                     (100, 7, torch.bfloat16)])
def test_capture_inputs(ours, token_budget, slots, dtype):
    from fused_moonvit.integration.kimi_vl import PLAN_KEY

    capture = ours.prepare_encoder_cudagraph_capture_inputs(token_budget, slots, slots, torch.device("cpu"), dtype)
    values = capture.values
    assert set(values) == set(ours.get_encoder_cudagraph_config().buffer_keys)
    # Budgets are output tokens at vLLM's boundary and patches inside.
    assert values["pixel_values"].shape == (4 * token_budget, 3, 14, 14)
    assert values["pixel_values"].dtype == dtype
    plan = values[PLAN_KEY]
    assert plan.dtype == torch.int32 and plan.shape == (5 * slots + 2,)
    # All padding: every slot empty, one padding sequence over the whole budget.
    assert plan[: slots + 2].tolist() == [0] * (slots + 1) + [4 * token_budget]
    if dtype == torch.float32:  # the manager captures in the model's dtype
        out = ours.encoder_cudagraph_forward(dict(values))
        assert out.shape == (token_budget, TEXT_HIDDEN) and torch.isfinite(out).all()


@pytest.mark.parametrize("image_set", sorted(IMAGE_SETS))
def test_replay_buffers_fit_capture_buffers(ours, image_set):
    from fused_moonvit.integration.kimi_vl import PLAN_KEY

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
    from fused_moonvit.integration.kimi_vl import PLAN_KEY
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
        # The forward ran on a plan whose trailing padding sequence reaches the budget, so every row,
        # padding included, is what the full plan for this budget computes.
        exact = ours.fused_encoder.forward_static(buffers["pixel_values"], build_plan(grids, 640, 8))
    assert plan_cu_seqlens(buffers[PLAN_KEY])[-1].item() == 640
    assert torch.equal(out, exact)
    assert out.shape == (160, TEXT_HIDDEN) and torch.isfinite(out).all()
    assert_matches(out[: sum(h * w // 4 for h, w in grids)].split([h * w // 4 for h, w in grids]),
                   reference["several"])


class RerunGraph:
    """A captured CUDA graph's stand-in on the CPU: replay reruns the recorded forward on the recorded
    buffers, which is what replaying the graph computes."""

    def __init__(self, model, budget, buffers, output, replays):
        self.model, self.budget, self.buffers, self.output, self.replays = model, budget, buffers, output, replays

    def replay(self):
        self.replays.append(self.budget)
        self.output.copy_(self.model.encoder_cudagraph_forward({**self.buffers}, path="default"))


def manager_for(model, config):
    """vLLM's EncoderCudaGraphManager for `model`, with every budget 'captured' as a RerunGraph."""
    from vllm.v1.worker.encoder_cudagraph import BudgetGraphMetadata, EncoderCudaGraphManager

    device = torch.device("cpu")
    manager = EncoderCudaGraphManager(vllm_config=config, device=device, dtype=torch.float32, model=model)
    replays = []
    for budget in manager.token_budgets:
        capture = model.prepare_encoder_cudagraph_capture_inputs(
            budget, manager.max_batch_size, manager.max_frames_per_batch, device, torch.float32, "default", ())
        with torch.inference_mode():
            output = torch.empty_like(model.encoder_cudagraph_forward({**capture.values}, path="default"))
        manager._get_graph_set("default")[budget] = BudgetGraphMetadata(
            token_budget=budget, max_batch_size=manager.max_batch_size,
            max_frames_per_batch=manager.max_frames_per_batch,
            graph=RerunGraph(model, budget, capture.values, output, replays),
            input_buffers=capture.values, output_buffer=output)
    return manager, replays


def test_auto_budgets(ours, model_dir):
    """Without user budgets, vLLM infers them from the model's range (in output tokens)."""
    from vllm.config import CompilationConfig

    config = vllm_config(model_dir, compilation=CompilationConfig(cudagraph_mm_encoder=True))
    manager, _ = manager_for(ours, config)
    assert manager.token_budgets == [64, 128, MAX_MODEL_LEN]
    for budget in manager.token_budgets:
        graph = manager._get_graph_set("default")[budget]
        assert graph.input_buffers["pixel_values"].shape[0] == 4 * budget
        assert graph.output_buffer.shape == (budget, TEXT_HIDDEN)


# Each case: the images, the budgets the manager replays, and how many images take the eager fallback.
MANAGER_CASES = {
    # sorted by size (1, 15, 30 tokens); vLLM splits off the 30 because 16 + 32 < 64
    "packed": ([(6, 10), (2, 2), (10, 12)], [16, 32], 0),
    # one image that fills its budget exactly: no padding rows at all
    "exact_fit": ([(16, 16)], [64], 0),
    # 72 tokens, above the largest budget: vLLM runs encoder_eager_forward for it
    "oversized": ([(18, 16), (2, 2)], [16], 1),
    # more images than max_batch_size slots: two batches
    "many": ([(4, 4)] * 5, [16, 16], 0),
}


@pytest.mark.parametrize("case", sorted(MANAGER_CASES))
@pytest.mark.parametrize("data_parallel", [False, True], ids=["local", "dp"])
def test_manager_execute_matches_stock(ours, stock, model_dir, case, data_parallel):
    from vllm.config import CompilationConfig

    grids, budgets, eager = MANAGER_CASES[case]
    config = vllm_config(model_dir, compilation=CompilationConfig(
        cudagraph_mm_encoder=True, encoder_cudagraph_token_budgets=[16, 32, 64],
        encoder_cudagraph_max_vision_items_per_batch=4))
    manager, replays = manager_for(ours, config)
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


def test_protocol_feature_detection_against_other_layouts():
    """The dataclass and signature shims work for layouts other than the installed vLLM's."""
    import dataclasses

    from fused_moonvit.integration.kimi_vl import _make, _protocol_arguments

    @dataclasses.dataclass
    class Older:
        values: dict

    @dataclasses.dataclass
    class Newer:
        values: dict
        frames: int

    assert _make(Older, values={"a": 1}, out_hidden_size=3) == Older(values={"a": 1})
    with pytest.raises(RuntimeError, match=r"requires \['frames'\].*FUSED_MOONVIT_DISABLE"):
        _make(Newer, values={})
    # positional or keyword, the arguments come back by name
    by_position = _protocol_arguments("prepare_encoder_cudagraph_capture_inputs",
                                      (256, 4, 1, torch.device("cpu"), torch.float32), {})
    by_name = _protocol_arguments("prepare_encoder_cudagraph_capture_inputs", (),
                                  dict(token_budget=256, max_batch_size=4, max_frames_per_batch=1,
                                       device=torch.device("cpu"), dtype=torch.float32))
    assert by_position == by_name and by_name["token_budget"] == 256 and by_name["path"] == "default"
