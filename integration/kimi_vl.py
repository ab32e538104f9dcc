"""`FusedKimiVLForConditionalGeneration`: vLLM's Kimi-VL model with the fused MoonVit encoder.

A subclass of vLLM's `KimiVLForConditionalGeneration`, so the processor registration, the language model,
the weight loader and everything else about serving stay vLLM's. Only the vision tower and projector are
ours: one `FusedMoonVit`, whose two halves sit at `vision_tower` and `multi_modal_projector` with the
checkpoint's parameter names, so vLLM's `AutoWeightsLoader` fills them like any plain module.

Encoder CUDA graphs (vLLM's `SupportsEncoderCudaGraph`, on with `cudagraph_mm_encoder`): the buffers, the
replay values, the padding logics and the graph body are `encoder_graph`'s, which imports no vLLM; this
class adapts them to the installed release's protocol by feature detection (the dataclasses' fields and the
protocol methods' parameter names), not by version checks. Tested on vLLM 0.33.0 and 0.34.0.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models import kimi_vl as vllm_kimi_vl
from vllm.model_executor.models.interfaces import SupportsEncoderCudaGraph
from vllm.model_executor.models.vision import run_dp_sharded_mrope_vision_model
from vllm.v1.worker import encoder_cudagraph_defs

from fused_moonvit.integration import encoder_graph
from fused_moonvit.integration.encoder_graph import PATCHES_PER_TOKEN
from fused_moonvit.moonvit.config import MoonVitConfig
from fused_moonvit.moonvit.fused import FusedMoonVit

# The fields vLLM's MoonViTConfig defines; vLLM hard-codes the LayerNorm eps and RoPE base that
# MoonVitConfig's defaults already match.
_VISION_FIELDS = ("patch_size", "init_pos_emb_height", "init_pos_emb_width", "num_attention_heads",
                  "num_hidden_layers", "hidden_size", "intermediate_size", "merge_kernel_size")

# The names the parent's __init__ builds its tower with, and the attributes it assigns the results to
# (which are the checkpoint's names for the encoder's parameters).
_TOWER_CONSTRUCTORS = {"MoonVitPretrainedModel": "vision_tower",
                       "KimiVLMultiModalProjector": "multi_modal_projector"}
_ENCODER_PREFIXES = tuple(f"{name}." for name in _TOWER_CONSTRUCTORS.values())

_UNSUPPORTED = "set FUSED_MOONVIT_DISABLE=1 to use vLLM's own encoder"


def moonvit_config(hf_config) -> MoonVitConfig:
    """Our encoder's config from vLLM's `KimiVLConfig`."""
    vision = hf_config.vision_config
    return MoonVitConfig(**{k: getattr(vision, k) for k in _VISION_FIELDS},
                         text_hidden_size=hf_config.text_config.hidden_size)


@functools.cache
def _protocol_signature(method: str) -> inspect.Signature:
    return inspect.signature(getattr(SupportsEncoderCudaGraph, method))


def _protocol_arguments(method: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The manager's arguments to a protocol method, by name, as the installed vLLM's protocol lays
    them out: the positions have moved between vLLM releases (e.g. `max_frames_per_batch`), the names
    we read have not."""
    signature = _protocol_signature(method)
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    return arguments


def _make(cls: type, **candidates: Any) -> Any:
    """Builds one of vLLM's protocol dataclasses from the fields the installed release has; candidates
    it lacks are left out (a release without `padding_logics` copies buffers its own way)."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    required = {f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - candidates.keys())
    if missing:
        raise RuntimeError(f"this vLLM's {cls.__name__} requires {missing}, which fused-moonvit does not "
                           f"know how to fill; {_UNSUPPORTED}")
    names = {f.name for f in fields}
    return cls(**{k: v for k, v in candidates.items() if k in names})


def _refuse_sharded_encoder(vllm_config: VllmConfig) -> None:
    mode = vllm_config.model_config.get_multimodal_config().mm_encoder_tp_mode
    tp = vllm_config.parallel_config.tensor_parallel_size
    if mode != "data" and tp > 1:
        raise ValueError(
            "fused-moonvit's encoder is not sharded across tensor-parallel ranks "
            f"(mm_encoder_tp_mode={mode!r}, tensor_parallel_size={tp}). Use mm_encoder_tp_mode=\"data\" "
            "(--mm-encoder-tp-mode data), which runs the encoder with full weights on every rank, each on "
            "its share of the images; or set FUSED_MOONVIT_DISABLE=1 to use vLLM's own encoder.")


class _FusedTowerConstructors:
    """Stand-ins for the two constructors the parent's `__init__` builds its tower with: each hands out
    one half of a single `FusedMoonVit`, so vLLM's MoonVit is never built. The parent calls them inside
    its own `_mark_tower_model` context, so they are marked as the image tower."""

    def __init__(self, config: MoonVitConfig, model_prefix: str):
        self.config = config
        self.model_prefix = model_prefix
        self.encoder: FusedMoonVit | None = None
        self.built: list[str] = []

    def _half(self, attribute: str, prefix: str, quant_config: object) -> torch.nn.Module:
        # The parent names each half's prefix after the attribute it assigns it to; the checkpoint's names
        # for our parameters are those attributes, so a different one is a layout we do not know.
        expected = f"{self.model_prefix}.{attribute}" if self.model_prefix else attribute
        if prefix != expected:
            raise RuntimeError(f"vLLM's Kimi-VL builds its {attribute} under the prefix {prefix!r}, not "
                               f"{expected!r}; this vLLM release is not supported ({_UNSUPPORTED})")
        # vLLM 0.33 and 0.34 build the tower without a quantization config, so its weights are unquantized
        # whatever the checkpoint's quantization; the fused kernels run on plain bf16/fp16/fp32 weights only.
        if quant_config is not None:
            raise ValueError(f"fused-moonvit's encoder runs unquantized vision weights only, but vLLM asks for "
                             f"its {attribute} quantized ({type(quant_config).__name__}); {_UNSUPPORTED}")
        if self.encoder is None:
            self.encoder = FusedMoonVit(self.config)
        self.built.append(attribute)
        return getattr(self.encoder, attribute)

    # Their config arguments are the parent's (vLLM's MoonViTConfig, KimiVLConfig); the encoder is built
    # from the MoonVitConfig derived from the same HF config.
    def vision_tower(self, *config_args, prefix: str = "", quant_config=None, **config_kwargs) -> torch.nn.Module:
        return self._half("vision_tower", prefix, quant_config)

    def multi_modal_projector(self, *config_args, prefix: str = "", quant_config=None,
                              **config_kwargs) -> torch.nn.Module:
        return self._half("multi_modal_projector", prefix, quant_config)


def _parent_init_with(constructors: _FusedTowerConstructors) -> Callable[..., None]:
    """The parent's `__init__`, with its tower constructors resolved to `constructors`, for this one call.

    The function runs with a copy of its module's globals in which the two names are ours: nothing
    process-wide changes, so a stock Kimi-VL built meanwhile (another thread, another model) gets vLLM's
    own tower."""
    init = vllm_kimi_vl.KimiVLForConditionalGeneration.__init__
    if (not isinstance(init, types.FunctionType) or init.__globals__ is not vars(vllm_kimi_vl)
            or not set(_TOWER_CONSTRUCTORS) <= set(init.__code__.co_names)):
        raise RuntimeError("vLLM's KimiVLForConditionalGeneration.__init__ no longer builds its tower through "
                           f"{' and '.join(_TOWER_CONSTRUCTORS)}; this vLLM release is not supported "
                           f"({_UNSUPPORTED})")
    scope = dict(init.__globals__)
    for name, attribute in _TOWER_CONSTRUCTORS.items():
        scope[name] = getattr(constructors, attribute)
    rebound = types.FunctionType(init.__code__, scope, init.__name__, init.__defaults__, init.__closure__)
    rebound.__kwdefaults__ = init.__kwdefaults__
    return rebound


class _DataParallelView:
    """What `run_dp_sharded_mrope_vision_model` reads of a vision model, for the fused encoder.

    Its "rope_3d" layout is the one for an encoder that returns (tokens, hidden) with the merge already
    folded in, as ours does (projector included); its "rope_2d" layout expects MoonVit's pre-projector
    (tokens, 4, hidden) features.
    """

    spatial_merge_size = 2

    def __init__(self, encoder: FusedMoonVit):
        self.encoder = encoder
        self.out_hidden_size = encoder.config.output_size

    @property
    def dtype(self) -> torch.dtype:
        # vLLM 0.34 sizes the placeholders of ranks without images by it; 0.33 by the first parameter.
        return self.encoder.dtype

    def parameters(self):
        return self.encoder.parameters()

    def __call__(self, pixel_values: torch.Tensor, grid_hws) -> torch.Tensor:
        return self.encoder(pixel_values, grid_hws)


class FusedKimiVLForConditionalGeneration(vllm_kimi_vl.KimiVLForConditionalGeneration):
    """vLLM's Kimi-VL with the fused MoonVit encoder as its vision tower and projector."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        _refuse_sharded_encoder(vllm_config)
        constructors = _FusedTowerConstructors(moonvit_config(vllm_config.model_config.hf_config), prefix)
        _parent_init_with(constructors)(self, vllm_config=vllm_config, prefix=prefix)
        if sorted(constructors.built) != sorted(_TOWER_CONSTRUCTORS.values()):
            raise RuntimeError(f"vLLM's KimiVLForConditionalGeneration.__init__ built {constructors.built} of "
                               f"the tower, not each of {list(_TOWER_CONSTRUCTORS.values())} once; this vLLM "
                               f"release is not supported ({_UNSUPPORTED})")
        # Kept off the module tree, as vLLM's own StageMissingLayer keeps its wrapped module: its two
        # halves are already registered under the checkpoint's names, and a second registration would
        # give every encoder parameter a second name.
        self.__dict__["fused_encoder"] = constructors.encoder
        self._dp_view = _DataParallelView(constructors.encoder)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        encoder_names = {f"{half}.{name}" for half in _TOWER_CONSTRUCTORS.values()
                         for name, _ in getattr(self.fused_encoder, half).named_parameters()}

        def checked(weights):
            for name, tensor in weights:
                if name.startswith(_ENCODER_PREFIXES) and name not in encoder_names:
                    raise ValueError(f"the checkpoint has {name!r}, which the fused encoder does not have: "
                                     "fused-moonvit loads unquantized vision weights only (as vLLM's own "
                                     f"Kimi-VL does); {_UNSUPPORTED}")
                yield name, tensor

        return super().load_weights(checked(weights))

    # -- eager path (embed_multimodal) --

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        pixel_values = image_input["pixel_values"]
        grid = image_input["image_grid_hws"].tolist()
        if self.use_data_parallel:
            return run_dp_sharded_mrope_vision_model(self._dp_view, pixel_values, grid, rope_type="rope_3d")
        tokens = [h * w // PATCHES_PER_TOKEN for h, w in grid]
        return self.fused_encoder(pixel_values, grid).split(tokens)

    # -- SupportsEncoderCudaGraph --

    def get_encoder_cudagraph_config(self):
        return _make(encoder_cudagraph_defs.EncoderCudaGraphConfig, modalities=["image"],
                     buffer_keys=list(encoder_graph.BUFFER_KEYS), out_hidden_size=self.hidden_size,
                     padding_logics=dict(encoder_graph.PADDING_LOGICS))

    def get_encoder_cudagraph_item_specs(self, mm_kwargs: dict[str, Any]):
        return [_make(encoder_cudagraph_defs.EncoderItemSpec, input_size=h * w,
                      output_tokens=h * w // PATCHES_PER_TOKEN)
                for h, w in self._get_grid_hws(mm_kwargs)]

    def select_encoder_cudagraph_items(self, mm_kwargs: dict[str, Any], indices: list[int]) -> dict[str, Any]:
        pixel_values, grid = encoder_graph.select_items(mm_kwargs["pixel_values"], self._get_grid_hws(mm_kwargs),
                                                        indices)
        # The grid stays on the host (vLLM keeps `image_grid_hws` on the CPU), so that building the
        # replay plan from it never waits on the device.
        return {"pixel_values": pixel_values, "image_grid_hws": torch.tensor(grid, dtype=torch.long).view(-1, 2)}

    def prepare_encoder_cudagraph_capture_inputs(self, *args, **kwargs):
        a = _protocol_arguments("prepare_encoder_cudagraph_capture_inputs", args, kwargs)
        values = encoder_graph.capture_buffers(self.fused_encoder, a["token_budget"], a["max_batch_size"],
                                               a["device"], a["dtype"])
        return _make(encoder_cudagraph_defs.EncoderCudaGraphCaptureInputs, values=values)

    def prepare_encoder_cudagraph_replay_buffers(self, *args, **kwargs):
        a = _protocol_arguments("prepare_encoder_cudagraph_replay_buffers", args, kwargs)
        mm_kwargs = a["mm_kwargs"]
        values = encoder_graph.replay_values(self.fused_encoder, mm_kwargs["pixel_values"],
                                             self._get_grid_hws(mm_kwargs), a["max_batch_size"])
        return _make(encoder_cudagraph_defs.EncoderCudaGraphReplayBuffers, values=values)

    def encoder_cudagraph_forward(self, *args, **kwargs) -> torch.Tensor:
        values = next(iter(_protocol_arguments("encoder_cudagraph_forward", args, kwargs).values()))
        return encoder_graph.graph_forward(self.fused_encoder, values)

    def encoder_eager_forward(self, *args, **kwargs) -> torch.Tensor:
        mm_kwargs = _protocol_arguments("encoder_eager_forward", args, kwargs)["mm_kwargs"]
        return self.fused_encoder(mm_kwargs["pixel_values"], self._get_grid_hws(mm_kwargs))
