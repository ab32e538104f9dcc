"""The installed vLLM's (0.33.0 or 0.34.0) own MoonVit and Kimi-VL projector, built on the CPU, as the parity peer.

vLLM's layers need a current `VllmConfig`, an initialised (gloo, world size 1) distributed state, and
`process_weights_after_loading` on each linear layer once weights are in. `VLLM_TARGET_DEVICE=cpu` must
be set before vLLM is imported; tests/conftest.py does it.
"""

from __future__ import annotations

import json
import socket
from functools import lru_cache

import pytest
import torch
from moonvit_fixtures import k25_vision_config, kimi_vl_config_json, rel_err

from fused_moonvit.moonvit import MoonVitConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@lru_cache(maxsize=None)
def init_vllm_cpu() -> None:
    """Initialises vLLM's distributed state once per process (gloo, world size 1, TP 1)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{_free_port()}", backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=1)


def write_tiny_kimi_vl_dir(directory, vision: MoonVitConfig, max_position_embeddings: int = 256):
    """A local Kimi-VL model directory (config.json only) that vLLM's ModelConfig accepts: `vision` as the
    tower, and a dense one-layer DeepseekV2 with MLA as the text model (transformers' DeepseekV2Config
    insists on an int kv_lora_rank)."""
    config = kimi_vl_config_json(vision)
    config["text_config"].update(model_type="deepseek_v2", num_attention_heads=2, num_key_value_heads=2,
                                 num_hidden_layers=1, intermediate_size=16, vocab_size=64, kv_lora_rank=8,
                                 q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                 first_k_dense_replace=1, max_position_embeddings=max_position_embeddings)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def vllm_kimi_config(config: MoonVitConfig):
    """vLLM's `KimiVLConfig` for our `MoonVitConfig` (a text config of the right width only)."""
    from vllm.transformers_utils.configs.kimi_vl import KimiVLConfig

    vision = dict(patch_size=config.patch_size, init_pos_emb_height=config.init_pos_emb_height,
                  init_pos_emb_width=config.init_pos_emb_width, num_attention_heads=config.num_attention_heads,
                  num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, merge_kernel_size=list(config.merge_kernel_size))
    # The projector reads only the text width; the rest keeps DeepseekV2Config's validation happy.
    text = dict(hidden_size=config.text_hidden_size, num_attention_heads=1, num_key_value_heads=1,
                num_hidden_layers=1, intermediate_size=8, vocab_size=64)
    return KimiVLConfig(vision_config=vision, text_config=text)


class VllmMoonVit(torch.nn.Module):
    """vLLM's `MoonVitPretrainedModel` + `KimiVLMultiModalProjector`, run the way `KimiVLForConditionalGeneration`
    runs them in its eager path (`_process_image_input`)."""

    def __init__(self, config: MoonVitConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
        super().__init__()
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.models.kimi_vl import KimiVLMultiModalProjector
        from vllm.model_executor.models.moonvit import MoonVitPretrainedModel

        init_vllm_cpu()
        kimi = vllm_kimi_config(config)
        old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with set_current_vllm_config(VllmConfig()):
                self.vision_tower = MoonVitPretrainedModel(kimi.vision_config, prefix="vision_tower")
                self.multi_modal_projector = KimiVLMultiModalProjector(kimi, prefix="multi_modal_projector")
        finally:
            torch.set_default_dtype(old_dtype)
        self.to(dtype)
        self._load(state_dict)

    def _load(self, state_dict: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise KeyError(f"vLLM MoonVit key mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for k, v in state_dict.items():
                own[k].copy_(v.view(own[k].shape).to(own[k].dtype))
        for module in self.modules():
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        from vllm.config import VllmConfig, set_current_vllm_config

        dtype = next(self.parameters()).dtype
        with set_current_vllm_config(VllmConfig()):
            features = self.vision_tower(pixel_values.to(dtype), grid_hws)
            return self.multi_modal_projector(torch.cat(features))


def vllm_moonvit3d_vision_config(config: MoonVitConfig):
    """vLLM's vision config for a MoonViT3d `MoonVitConfig`: transformers' `Kimi_K25VisionConfig` with the
    options vLLM reads by getattr (K2.5 leaves them at their defaults), or vLLM's `KimiK3VisionConfig`
    when the projector is K3's."""
    options = dict(qkv_hidden_size=config.qkv_hidden_size, norm_type=config.norm_type, attn_bias=config.attn_bias,
                   linear_bias=config.linear_bias, patch_embed_proj_bias=config.patch_embed_proj_bias,
                   pos_emb_interpolation_mode=config.pos_emb_interpolation, mm_projector_type=config.projector_type,
                   projector_ln_eps=config.projector_ln_eps)
    if config.projector_type == "patchmergerv2":
        from vllm.transformers_utils.configs.kimi_k3 import KimiK3VisionConfig

        return KimiK3VisionConfig(
            patch_size=config.patch_size, init_pos_emb_height=config.init_pos_emb_height,
            init_pos_emb_width=config.init_pos_emb_width, init_pos_emb_time=config.pos_emb_time,
            vt_num_attention_heads=config.num_attention_heads, vt_num_hidden_layers=config.num_hidden_layers,
            vt_hidden_size=config.hidden_size, vt_intermediate_size=config.intermediate_size,
            text_hidden_size=config.text_hidden_size, activation_func=config.hidden_act, **options)
    vision = k25_vision_config(config)
    for k, v in options.items():
        setattr(vision, k, v)
    return vision


# Our MoonViT3d projector keeps the checkpoint's names; vLLM's loader renames them so.
VLLM_K25_RENAMES = {"mm_projector.proj.0.": "mm_projector.linear_1.", "mm_projector.proj.2.": "mm_projector.linear_2."}


def to_vllm_k25_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        for old, new in VLLM_K25_RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


class VllmMoonViT3d(VllmMoonVit):
    """vLLM's `MoonViT3dPretrainedModel` + `KimiK25MultiModalProjector` (K2.5 / K2.6, or K3's options), run
    as `KimiK25ForConditionalGeneration` runs them eagerly (`vision_tower_forward` without data
    parallelism): the tower's per-item (n, 4, C) outputs, concatenated, through the projector."""

    def __init__(self, config: MoonVitConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.models.kimi_k25_vit import KimiK25MultiModalProjector, MoonViT3dPretrainedModel

        init_vllm_cpu()
        vision = vllm_moonvit3d_vision_config(config)
        old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with set_current_vllm_config(VllmConfig()):
                self.vision_tower = MoonViT3dPretrainedModel(vision, prefix="vision_tower")
                self.mm_projector = KimiK25MultiModalProjector(vision, config.text_hidden_size,
                                                               prefix="mm_projector")
        finally:
            torch.set_default_dtype(old_dtype)
        self.to(dtype)
        self._load(to_vllm_k25_names(state_dict))

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.models.kimi_k25_vit import vision_tower_forward

        dtype = next(self.parameters()).dtype
        with set_current_vllm_config(VllmConfig()):
            out = vision_tower_forward(self.vision_tower, pixel_values.to(dtype), grid_thws, self.mm_projector,
                                       use_data_parallel=False)
        return torch.cat(out)


def kimi_k25_config_json(vision: MoonVitConfig, max_position_embeddings: int = 256) -> dict:
    """A Kimi-K2.5 config.json (model_type kimi_k25) that transformers' `Kimi_K25Config` and vLLM accept:
    `vision` (a MoonViT3d config) under the vision names vLLM's MoonViT3d reads, and a dense one-layer
    DeepseekV3 with MLA as the text model."""
    vision_config = dict(
        model_type="kimi_k25_vision", patch_size=vision.patch_size, pos_emb_height=vision.init_pos_emb_height,
        pos_emb_width=vision.init_pos_emb_width, pos_emb_time=vision.pos_emb_time,
        num_attention_heads=vision.num_attention_heads, num_hidden_layers=vision.num_hidden_layers,
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size, hidden_act=vision.hidden_act,
        merge_kernel_size=list(vision.merge_kernel_size),
        # MoonViT3d's options with their only supported values, as Kimi-K2.5's checkpoint names them.
        merge_type="sd2_tpool", pos_emb_type="divided_fixed", video_attn_type="spatial_temporal",
        mm_projector_type="patchmerger")
    text_config = dict(model_type="deepseek_v3", hidden_size=vision.text_hidden_size, num_attention_heads=2,
                       num_key_value_heads=2, num_hidden_layers=1, intermediate_size=16, moe_intermediate_size=8,
                       vocab_size=64, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                       topk_group=1, max_position_embeddings=max_position_embeddings)
    return {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
            "vision_config": vision_config, "text_config": text_config}


def write_tiny_kimi_k25_dir(directory, vision: MoonVitConfig, max_position_embeddings: int = 256,
                            image_mean: list[float] | None = None, image_std: list[float] | None = None):
    """A local Kimi-K2.5 model directory (config.json, and with `image_mean`/`image_std` a
    preprocessor_config.json whose `media_proc_cfg` holds them, as Kimi-K2.5's does: vLLM then
    normalises raw uint8 pixels on the device, (x / 255 - mean) / std per channel)."""
    (directory / "config.json").write_text(json.dumps(kimi_k25_config_json(vision, max_position_embeddings)))
    write_media_normalisation(directory, vision, image_mean, image_std)
    return directory


def write_media_normalisation(directory, vision: MoonVitConfig, image_mean: list[float] | None,
                              image_std: list[float] | None) -> None:
    """With a mean and std, the preprocessor_config.json (its `media_proc_cfg`) Kimi-K2.5's and K3's
    checkpoints ship, from which vLLM normalises raw uint8 pixels on the device."""
    if image_mean is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(
            {"media_proc_cfg": {"image_mean": image_mean, "image_std": image_std, "patch_size": vision.patch_size,
                                "merge_kernel_size": list(vision.merge_kernel_size)}}))


def kimi_k3_config_json(vision: MoonVitConfig, max_position_embeddings: int = 256) -> dict:
    """A Kimi-K3 config.json (model_type kimi_k3) that vLLM's `KimiK3Config` accepts: `vision` (a MoonViT3d
    config with K3's options) under the names K3's checkpoints use (`vt_*`, `init_pos_emb_*`), and a
    one-layer KimiLinear text config, which only sizes things here: K3's language model cannot be built
    on a CPU, and the tests replace it (`KimiK3LanguageStandIn`)."""
    vision_config = dict(
        model_type="kimi_k3_vision", patch_size=vision.patch_size, init_pos_emb_height=vision.init_pos_emb_height,
        init_pos_emb_width=vision.init_pos_emb_width, init_pos_emb_time=vision.pos_emb_time,
        vt_num_attention_heads=vision.num_attention_heads, vt_num_hidden_layers=vision.num_hidden_layers,
        vt_hidden_size=vision.hidden_size, vt_intermediate_size=vision.intermediate_size,
        merge_kernel_size=list(vision.merge_kernel_size), qkv_hidden_size=vision.qkv_hidden_size,
        norm_type=vision.norm_type, attn_bias=vision.attn_bias, linear_bias=vision.linear_bias,
        patch_embed_proj_bias=vision.patch_embed_proj_bias, pos_emb_interpolation_mode=vision.pos_emb_interpolation,
        mm_projector_type=vision.projector_type, projector_ln_eps=vision.projector_ln_eps,
        activation_func=vision.hidden_act, text_hidden_size=vision.text_hidden_size)
    text_config = dict(model_type="kimi_linear", vocab_size=64, hidden_size=vision.text_hidden_size,
                       intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=max_position_embeddings)
    return {"model_type": "kimi_k3", "architectures": ["KimiK3ForConditionalGeneration"],
            "vision_config": vision_config, "text_config": text_config}


def write_tiny_kimi_k3_dir(directory, vision: MoonVitConfig, max_position_embeddings: int = 256,
                           architecture: str = "KimiK3ForConditionalGeneration", image_mean: list[float] | None = None,
                           image_std: list[float] | None = None):
    """A local Kimi-K3 model directory naming `architecture` (K3's, or K3.1's): config.json, and with
    `image_mean`/`image_std` the preprocessor config from which vLLM normalises raw pixels."""
    config = kimi_k3_config_json(vision, max_position_embeddings)
    config["architectures"] = [architecture]
    (directory / "config.json").write_text(json.dumps(config))
    write_media_normalisation(directory, vision, image_mean, image_std)
    return directory


class KimiK3LanguageStandIn(torch.nn.Module):
    """What Kimi-K3's `__init__` and loader use of its language model, which cannot be built on a CPU
    (KimiLinear's kernels): one parameter, loaded by name, and the methods `__init__` and
    `process_weights_after_loading` call."""

    def __init__(self, *, vllm_config, hf_config, prefix: str = "", architectures=None):
        super().__init__()
        self.stand_in = torch.nn.Linear(hf_config.hidden_size, 4, bias=False)
        self.make_empty_intermediate_tensors = None

    def process_weights_after_loading(self) -> None:
        pass


# -- building vLLM models from a tiny model directory (the drop-in tests) --

MAX_MODEL_LEN = 256


def vllm_config(model_dir, *, compilation=None, parallel=None, **model_kwargs):
    from vllm.config import ModelConfig, VllmConfig

    model_config = ModelConfig(model=str(model_dir), dtype="float32", skip_tokenizer_init=True,
                               max_model_len=MAX_MODEL_LEN, enforce_eager=True, **model_kwargs)
    extra = {k: v for k, v in (("compilation_config", compilation), ("parallel_config", parallel)) if v is not None}
    return VllmConfig(model_config=model_config, **extra)


def build(model_class, model_dir, checkpoint=None, **model_kwargs):
    """One model, in its own VllmConfig (vLLM registers attention layers per config), with `checkpoint`
    loaded through the model's own `load_weights`, which must fill every parameter."""
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading

    config = vllm_config(model_dir, **model_kwargs)
    model = initialize_model(config, model_class=model_class)
    if checkpoint is not None:
        loaded = model.load_weights(iter(checkpoint.items()))
        assert loaded == {name for name, _ in model.named_parameters()}
        process_weights_after_loading(model, config.model_config, torch.device("cpu"))
    return model.eval()


def assert_matches(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.isfinite(g).all()
        assert rel_err(g, w) <= tol


def thw_mm_kwargs(items, seed=0, raw=False):
    """MoonViT3d's multimodal kwargs for items of (t, h, w) patches: random pixels (raw uint8 ones with
    `raw`) and the `grid_thws` of Kimi-K2.5 and Kimi-K3."""
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in items)
    pixels = (torch.randint(0, 256, (n, 3, 14, 14), dtype=torch.uint8, generator=g) if raw
              else torch.randn(n, 3, 14, 14, generator=g))
    return {"pixel_values": pixels, "grid_thws": torch.tensor(items, dtype=torch.long).view(-1, 3)}


def stock_and_ours_fixtures(stock_class, ours_class, item_sets):
    """The module fixtures `stock` and `ours` (each class built from the `model_dir` fixture and loaded
    with the `checkpoint` fixture) and `reference`: stock vLLM's per-item embeddings, per item set."""

    @pytest.fixture(scope="module")
    def stock(model_dir, checkpoint):
        return build(stock_class(), model_dir, checkpoint)

    @pytest.fixture(scope="module")
    def ours(model_dir, checkpoint):
        return build(ours_class(), model_dir, checkpoint)

    @pytest.fixture(scope="module")
    def reference(stock):
        with torch.inference_mode():
            return {name: stock.embed_multimodal(**thw_mm_kwargs(items)) for name, items in item_sets.items()}

    return stock, ours, reference


def build_refusing_stock_tower(monkeypatch, model_class, model_dir, checkpoint, stock_tower_classes):
    """`model_class` built and loaded with vLLM's own tower and projector classes refusing to be built,
    and the `FusedMoonVit`s the drop-in built on the way, in order."""
    import fused_moonvit.integration.drop_in as drop_in

    def refuse(*args, **kwargs):
        raise AssertionError("vLLM's own vision tower was built")

    for cls in stock_tower_classes:
        monkeypatch.setattr(cls, "__init__", refuse)
    built = []

    class CountingFusedMoonVit(drop_in.FusedMoonVit):
        def __init__(self, config):
            built.append(self)
            super().__init__(config)

    monkeypatch.setattr(drop_in, "FusedMoonVit", CountingFusedMoonVit)
    return build(model_class, model_dir, checkpoint), built


def encoder_state(model, checkpoint) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's state outside its language model, and the checkpoint's names there."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    return state, {k for k in checkpoint if not k.startswith("language_model.")}


def assert_mapper_drops_only_projector_renames(ours_class, stock_class, kept: tuple[str, ...],
                                               renamed: tuple[str, str]):
    """Our drop-in's weight mapper keeps the checkpoint's encoder names (`kept`) where the stock class renames
    its projector (`renamed`: a checkpoint name and stock vLLM's), and keeps the parent's other renames:
    legacy checkpoints' language-model names."""
    mapper, parent = ours_class.hf_to_vllm_mapper, stock_class.hf_to_vllm_mapper
    for name in kept:
        assert mapper.map_name(name) == name
    assert parent.map_name(renamed[0]) == renamed[1]
    legacy = "language_model.layers.0.mlp.down_proj.weight"
    assert mapper.map_name(legacy) == parent.map_name(legacy) == "language_model.model.layers.0.mlp.down_proj.weight"


def assert_embeds_as_stock(model, items, want, text_hidden: int) -> None:
    """`model` embeds MoonViT3d items (random pixels, `thw_mm_kwargs`) into h/2 * w/2 rows each, as stock
    vLLM did (`want`)."""
    with torch.inference_mode():
        got = model.embed_multimodal(**thw_mm_kwargs(items))
    assert [g.shape for g in got] == [(h * w // 4, text_hidden) for _, h, w in items]
    assert_matches(got, want)


def assert_normalises_raw_pixels_as_stock(stock, ours, items) -> None:
    """Given raw uint8 pixels, ours embeds them as stock vLLM does, and the normalisation matters: the same
    pixels, read as already normalised, give other embeddings."""
    kwargs = thw_mm_kwargs(items, seed=7, raw=True)
    with torch.inference_mode():
        want = stock.embed_multimodal(**kwargs)
        assert_matches(ours.embed_multimodal(**kwargs), want)
        unnormalised = ours.fused_encoder(kwargs["pixel_values"].float(), kwargs["grid_thws"])
    assert rel_err(unnormalised[: want[0].shape[0]], want[0]) > 0.1
