"""The model families the encoder serves, one declaration each: everything that differs between Kimi-VL,
Kimi-K2.5 / K2.6 and Kimi-K3 / K3.1 is said here, and config reading, the modules, checkpoint loading,
the CLI, the vLLM plugin and drop-ins and the benchmarks read it.

A family is picked by its tower and projector (`family_of`), which config.json names through its
`model_type` (or, for a `vision_config` alone, its MoonViT3d fields). Adding a family, or another vLLM
architecture name for one (K3.1 is K3's class under a second name), is one entry here plus its drop-in
class, which only names its family and vLLM's parent.

Nothing here imports vLLM or Triton: the plugin reads these declarations in every vLLM process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .config import MoonVitConfig, moonvit3d_fields
from .modules import PatchMerger, PatchMergerV2, Projector

DISABLE_ENV = "FUSED_MOONVIT_DISABLE"
UNSUPPORTED = f"set {DISABLE_ENV}=1 to use vLLM's own encoder"


@dataclasses.dataclass(frozen=True)
class VllmModel:
    """The vLLM model class a family's drop-in replaces, and how that class builds and feeds its tower."""

    architectures: tuple[str, ...]  # the registry names the plugin points at the drop-in
    module: str  # where vLLM's class lives; imported only when vLLM resolves an architecture
    class_name: str
    drop_in: str  # ours, as the lazy "module:Class" string vLLM's registry takes
    # Constructor names in `module` -> the attribute the class assigns each result to (the checkpoint's prefix).
    tower_constructors: Mapping[str, str]
    eager_hook: str  # the class's method that encodes the parsed items in `embed_multimodal`
    grid_key: str  # where the item grid sits in the multimodal kwargs
    modalities: tuple[str, ...]  # the encoder CUDA-graph protocol's
    # Vision-config names vLLM's tower reads as they are; ours must read the same values.
    reads: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the CLI's and benchmarks' name
    title: str
    model_types: tuple[str, ...]  # config.json's model_type
    tower: str  # MoonVitConfig.tower
    projector_type: str  # MoonVitConfig.projector_type
    projector_name: str  # the projector's attribute, and the checkpoint's prefix for it
    projector: type[nn.Module]  # built from the MoonVitConfig; owns its fused forward
    vision_fields: Callable[[dict], dict]  # config.json's vision_config -> MoonVitConfig fields
    # The input pipeline: "moonvit" (images, this package's preprocess_images) or "kimi_k25" (images and
    # videos, transformers' Kimi-K2.5 processors, `preprocess.KimiK25Inputs`).
    inputs: str
    vllm: VllmModel
    # MoonVitConfig fields at the real model's sizes: what the benchmarks time and random weights are built as.
    benchmark: Mapping[str, Any]

    def moonvit_config(self, hf_config) -> MoonVitConfig:
        """Our encoder's config from vLLM's (Hugging Face's) config object of this family's model. A
        vision config whose names vLLM reads disagree with ours would give a tower unlike vLLM's."""
        vision = hf_config.vision_config
        fields = self.vision_fields(vision.to_dict())
        for name in self.vllm.reads:
            vllm_value = getattr(vision, name, None)
            if isinstance(vllm_value, tuple):
                vllm_value = list(vllm_value)
            if vllm_value is not None and vllm_value != fields.get(name, vllm_value):
                raise ValueError(f"vision_config.{name}={vllm_value!r}, which vLLM's tower reads, disagrees with "
                                 f"{fields[name]!r} from the checkpoint's other names for it (e.g. vt_{name}); "
                                 f"{UNSUPPORTED}")
        return MoonVitConfig(**fields, text_hidden_size=hf_config.text_config.hidden_size)

    def real_size_config(self) -> MoonVitConfig:
        """The encoder at the released model's sizes and options: what random weights of this family are
        built as (`build_model(cls, family=name)`, the CLI without `--model`) and what the benchmarks time."""
        return MoonVitConfig(**self.benchmark)


# The fields vLLM's Kimi-VL MoonViTConfig defines; vLLM hard-codes the LayerNorm eps and RoPE base, which
# MoonVitConfig's defaults match.
_KIMI_VL_VLLM_FIELDS = ("patch_size", "init_pos_emb_height", "init_pos_emb_width", "num_attention_heads",
                        "num_hidden_layers", "hidden_size", "intermediate_size", "merge_kernel_size")
# What vLLM's MoonViT3d reads by these names (the legacy and K3 `vt_*` names come first in ours).
_MOONVIT3D_VLLM_READS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "patch_size")


def _kimi_vl_fields(vision: dict) -> dict:
    return {k: v for k, v in vision.items() if k in MoonVitConfig._FIELDS and k != "text_hidden_size"}


_K25_TOWER_CONSTRUCTORS = {"MoonViT3dPretrainedModel": "vision_tower", "KimiK25MultiModalProjector": "mm_projector"}

KIMI_VL = Family(
    name="kimi-vl", title="Kimi-VL", model_types=("kimi_vl",), tower="moonvit", projector_type="patchmerger",
    projector_name="multi_modal_projector", projector=Projector, vision_fields=_kimi_vl_fields, inputs="moonvit",
    vllm=VllmModel(
        architectures=("KimiVLForConditionalGeneration",), module="vllm.model_executor.models.kimi_vl",
        class_name="KimiVLForConditionalGeneration",
        drop_in="fused_moonvit.integration.kimi_vl:FusedKimiVLForConditionalGeneration",
        tower_constructors={"MoonVitPretrainedModel": "vision_tower",
                            "KimiVLMultiModalProjector": "multi_modal_projector"},
        eager_hook="_process_image_input", grid_key="image_grid_hws", modalities=("image",),
        reads=_KIMI_VL_VLLM_FIELDS),
    benchmark={},  # MoonVitConfig's defaults are Kimi-VL-A3B's
)

KIMI_K25 = Family(
    name="kimi-k25", title="Kimi-K2.5 / K2.6", model_types=("kimi_k25",), tower="moonvit3d",
    projector_type="patchmerger", projector_name="mm_projector", projector=PatchMerger,
    vision_fields=moonvit3d_fields, inputs="kimi_k25",
    vllm=VllmModel(
        architectures=("KimiK25ForConditionalGeneration",), module="vllm.model_executor.models.kimi_k25",
        class_name="KimiK25ForConditionalGeneration",
        drop_in="fused_moonvit.integration.kimi_k25:FusedKimiK25ForConditionalGeneration",
        tower_constructors=_K25_TOWER_CONSTRUCTORS, eager_hook="_process_media_input", grid_key="grid_thws",
        modalities=("vision_chunk",), reads=_MOONVIT3D_VLLM_READS),
    # vLLM's defaults for a MoonViT3d vision_config (what the checkpoints hold), a 7168-wide text model.
    benchmark=dict(moonvit3d_fields({}), text_hidden_size=7168),
)

# vLLM's KimiK3VisionConfig defaults, as K3's checkpoints name them.
K3_VISION = dict(vt_num_attention_heads=12, vt_hidden_size=1024, vt_intermediate_size=4096, qkv_hidden_size=1536,
                 norm_type="rmsnorm", attn_bias=False, linear_bias=False, patch_embed_proj_bias=False,
                 pos_emb_interpolation_mode="bilinear", mm_projector_type="patchmergerv2",
                 activation_func="gelu_pytorch_tanh")

KIMI_K3 = Family(
    name="kimi-k3", title="Kimi-K3 / K3.1", model_types=("kimi_k3",), tower="moonvit3d",
    projector_type="patchmergerv2", projector_name="mm_projector", projector=PatchMergerV2,
    vision_fields=moonvit3d_fields, inputs="kimi_k25",
    vllm=VllmModel(
        # vLLM 0.34 registers both names to one class, in vllm/models/kimi_k3 (a package that picks the
        # NVIDIA or AMD implementation at import).
        architectures=("KimiK3ForConditionalGeneration", "KimiK31ForConditionalGeneration"),
        module="vllm.models.kimi_k3", class_name="KimiK3ForConditionalGeneration",
        drop_in="fused_moonvit.integration.kimi_k3:FusedKimiK3ForConditionalGeneration",
        tower_constructors=_K25_TOWER_CONSTRUCTORS, eager_hook="_process_media_input", grid_key="grid_thws",
        modalities=("image",), reads=_MOONVIT3D_VLLM_READS),
    # K3's text width is not public, so K2.5's stands in (it sizes the projector's last GEMM only).
    benchmark=dict(moonvit3d_fields(K3_VISION), text_hidden_size=7168),
)

FAMILIES = {family.name: family for family in (KIMI_VL, KIMI_K25, KIMI_K3)}


def family_named(name: str) -> Family:
    """The family called `name` ("kimi-vl", "kimi-k25", "kimi-k3")."""
    if name not in FAMILIES:
        known = ", ".join(f"{n!r} ({f.title})" for n, f in FAMILIES.items())
        raise ValueError(f"unknown model family {name!r}; the families are {known}")
    return FAMILIES[name]


def titles(families: Iterable[Family] | None = None) -> str:
    """The families' titles for a message: "Kimi-VL, Kimi-K2.5 / K2.6 or Kimi-K3 / K3.1" for all of them."""
    names = [f.title for f in (FAMILIES.values() if families is None else families)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def video_families() -> list[Family]:
    """The families whose encoder takes video chunks (their inputs come from transformers' Kimi-K2.5
    processors, which cut videos too)."""
    return [f for f in FAMILIES.values() if f.inputs == "kimi_k25"]


def family_of(config: MoonVitConfig) -> Family:
    """The family whose tower and projector `config` describes."""
    for family in FAMILIES.values():
        if (family.tower, family.projector_type) == (config.tower, config.projector_type):
            return family
    raise ValueError(f"no model family has a {config.tower!r} tower with a {config.projector_type!r} projector")


def family_of_model_type(model_type: str | None) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def vllm_architectures() -> dict[str, Family]:
    """Every vLLM architecture name a drop-in serves -> its family."""
    return {arch: family for family in FAMILIES.values() for arch in family.vllm.architectures}
