"""Helpers shared by the suite: small configs, random models and images, synthetic checkpoints."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from fused_moonvit.moonvit import MoonVitConfig, MoonVitReference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_config(**overrides) -> MoonVitConfig:
    """A small MoonVit with the real structure: 2 layers, 4 heads of 8, a 16x16 position table."""
    fields = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                  init_pos_emb_height=16, init_pos_emb_width=16, text_hidden_size=24)
    fields.update(overrides)
    return MoonVitConfig(**fields)


def random_model(config: MoonVitConfig, seed: int, dtype=torch.float32) -> MoonVitReference:
    """A reference model whose every parameter, biases and norms too, is drawn at random."""
    torch.manual_seed(seed)
    model = MoonVitReference(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("pos_emb.weight"):
                p.copy_(torch.randn_like(p))
            elif p.dim() > 1:
                p.copy_(torch.randn_like(p) / (p.numel() // p.shape[0]) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def write_gpu_figures(env_var: str, figures: dict) -> None:
    """Writes `figures` as JSON, with the device, versions and date, to the path in $`env_var` if set: how
    the GPU tests leave their figures for benchmarks/results."""
    path = os.environ.get(env_var)
    if not path:
        return
    import datetime

    import triton

    meta = {"device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__,
                                                                  "triton": triton.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(path, "w") as f:
        json.dump({"meta": meta, "cases": figures}, f, indent=1)


def k25_vision_config(config: MoonVitConfig):
    """transformers' `Kimi_K25VisionConfig` at `config`'s sizes (the K2.5 options it knows)."""
    from transformers import Kimi_K25VisionConfig

    return Kimi_K25VisionConfig(
        patch_size=config.patch_size, pos_emb_height=config.init_pos_emb_height,
        pos_emb_width=config.init_pos_emb_width, pos_emb_time=config.pos_emb_time,
        num_attention_heads=config.num_attention_heads, num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
        merge_kernel_size=list(config.merge_kernel_size))


def random_pixels(grid_hws, patch_size: int = 14, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(math.prod(g) for g in grid_hws)
    return torch.randn(n, 3, patch_size, patch_size, generator=g)


def write_checkpoint(directory, tensors: dict, config: dict, shards: int = 1) -> None:
    """Writes `config.json` plus `model.safetensors`, or `shards` files and an index."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(directory, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def kimi_vl_config_json(config: MoonVitConfig) -> dict:
    """A Kimi-VL style config.json for `config` (vision_config plus text_config.hidden_size)."""
    vision = {k: getattr(config, k) for k in MoonVitConfig._FIELDS if k not in ("text_hidden_size",)}
    vision["model_type"] = "moonvit"
    return {"model_type": "kimi_vl", "architectures": ["KimiVLForConditionalGeneration"],
            "vision_config": vision, "text_config": {"hidden_size": config.text_hidden_size}}


def tiny_k25_config(**overrides) -> MoonVitConfig:
    """A small MoonViT3d (Kimi-K2.5's tower and projector): tiny_config's sizes, a 4-frame time table."""
    fields = dict(tower="moonvit3d", pos_emb_time=4)
    fields.update(overrides)
    return tiny_config(**fields)


# Kimi-K3's tower options at tiny sizes: RMSNorm, no biases, a qkv wider than the hidden size (head dim 16
# from 4 heads of a 64-wide qkv), bilinear position embedding, the v2 projector.
K3_OPTIONS = dict(norm_type="rmsnorm", attn_bias=False, linear_bias=False, patch_embed_proj_bias=False,
                  qkv_hidden_size=64, projector_type="patchmergerv2", pos_emb_interpolation="bilinear")


def kimi_k25_config_json(config: MoonVitConfig) -> dict:
    """A config.json in the layout of moonshotai/Kimi-K2.5's and Kimi-K2.6's on the Hub (remote-code
    KimiK25Config: `vt_*` and `init_pos_emb_*` vision fields, a DeepSeek-V3 text_config, the language
    model's compressed-tensors quantization), at `config`'s sizes."""
    vision = {
        "init_pos_emb_height": config.init_pos_emb_height, "init_pos_emb_time": config.pos_emb_time,
        "init_pos_emb_width": config.init_pos_emb_width, "merge_kernel_size": [2, 2], "merge_type": "sd2_tpool",
        "mm_hidden_size": config.hidden_size, "mm_projector_type": "patchmerger", "model_type": "",
        "patch_size": config.patch_size, "pos_emb_type": "divided_fixed", "projector_hidden_act": "gelu",
        "projector_ln_eps": 1e-05, "text_hidden_size": config.text_hidden_size,
        "video_attn_type": "spatial_temporal", "vt_hidden_size": config.hidden_size,
        "vt_intermediate_size": config.intermediate_size, "vt_num_attention_heads": config.num_attention_heads,
        "vt_num_hidden_layers": config.num_hidden_layers,
    }
    quantization = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "group_size": 32, "num_bits": 4, "strategy": "group", "symmetric": True, "type": "int"}}},
        "format": "pack-quantized", "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                              "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
        "quant_method": "compressed-tensors", "quantization_status": "compressed"}
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                     "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
        "bos_token_id": 163584, "dtype": "bfloat16", "eos_token_id": 163585, "ignore_index": -100,
        "media_placeholder_token_id": 163605, "model_type": "kimi_k25", "pad_token_id": 163839,
        "quantization_config": quantization,
        "text_config": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                        "hidden_size": config.text_hidden_size, "num_hidden_layers": 1, "vocab_size": 64,
                        "quantization_config": quantization},
        "tie_word_embeddings": False, "transformers_version": "4.57.1", "use_unified_vision_chunk": True,
        "video_placeholder": "<|kimi_k25_video_placeholder|>", "vision_config": vision,
    }


# preprocessor_config.json as moonshotai/Kimi-K2.5 and Kimi-K2.6 ship it, for their remote-code processor.
KIMI_K25_PREPROCESSOR_JSON = {
    "auto_map": {"AutoProcessor": "kimi_k25_processor.KimiK25Processor",
                 "AutoImageProcessor": "kimi_k25_vision_processing.KimiK25VisionProcessor"},
    "media_proc_cfg": {
        "in_patch_limit": 16384, "patch_size": 14, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "merge_kernel_size": 2, "fixed_output_tokens": None, "patch_limit_on_one_side": 512,
        "in_patch_limit_each_frame": 4096, "in_patch_limit_video": None, "sample_fps": 2.0,
        "max_num_frames_each_video": None, "temporal_merge_kernel_size": 4, "timestamp_mode": "hh:mm:ss.fff",
        "config_type": "media_proc.processors.moonvit.MoonViTMediaProcessorConfig"},
}


def write_k25_checkpoint(directory, config: MoonVitConfig, seed: int, shards: int = 1, preprocessor=None,
                         language_model: bool = True) -> MoonVitReference:
    """A tiny Kimi-K2.5 directory: config.json in the Hub's layout, random encoder tensors under the
    checkpoint's names (vision_tower.*, mm_projector.*), a few language-model tensors, and
    `preprocessor` (a dict) as preprocessor_config.json if given. Returns the model it holds."""
    model = random_model(config, seed=seed)
    tensors = dict(model.state_dict())
    if language_model:
        g = torch.Generator().manual_seed(seed)
        tensors["language_model.model.embed_tokens.weight"] = torch.randn(64, config.text_hidden_size, generator=g)
        tensors["language_model.lm_head.weight"] = torch.randn(64, config.text_hidden_size, generator=g)
    write_checkpoint(directory, tensors, kimi_k25_config_json(config), shards=shards)
    if preprocessor is not None:
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f)
    return model


def write_video(path, frames: int, fps: int, w: int = 64, h: int = 48):
    """An MPEG-4 file whose frame i is a flat grey of level 20 * i (kept apart by lossy coding)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(frames):
            image = np.full((h, w, 3), 20 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
