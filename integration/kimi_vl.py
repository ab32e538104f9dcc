"""`FusedKimiVLForConditionalGeneration`: vLLM's Kimi-VL model with the fused MoonVit encoder.

A subclass of vLLM's `KimiVLForConditionalGeneration`, so the processor registration, the language model,
the weight loader and everything else about serving stay vLLM's. Only the vision tower and projector are
ours: one `FusedMoonVit`, whose two halves sit at `vision_tower` and `multi_modal_projector` with the
checkpoint's parameter names, so vLLM's `AutoWeightsLoader` fills them like any plain module.

Encoder CUDA graphs (vLLM's `SupportsEncoderCudaGraph`, on with `cudagraph_mm_encoder`): vLLM's budgets
count output tokens, the graph's rows count patches, B = 4 x token budget, and attention's `max_seqlen`
is baked as B patches. Two buffers are recorded: `pixel_values` (B patches) and the int32 plan of
`fused_moonvit.kernels.plan` (a fixed size for the manager's `max_batch_size` image slots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models import kimi_vl as vllm_kimi_vl
from vllm.model_executor.models.interfaces import SupportsEncoderCudaGraph
from vllm.model_executor.models.vision import run_dp_sharded_mrope_vision_model
from vllm.v1.worker import encoder_cudagraph_defs

from fused_moonvit.kernels.plan import build_plan, new_device_plan, plan_cu_seqlens, upload_plan
from fused_moonvit.moonvit.config import MoonVitConfig
from fused_moonvit.moonvit.fused import FusedMoonVit
from fused_moonvit.moonvit.inputs import check_inputs, patch_offsets

PLAN_KEY = "moonvit_plan"
PATCHES_PER_TOKEN = 4  # the 2x2 merge

# The fields vLLM's MoonViTConfig defines; vLLM hard-codes the LayerNorm eps and RoPE base that
# MoonVitConfig's defaults already match.
_VISION_FIELDS = ("patch_size", "init_pos_emb_height", "init_pos_emb_width", "num_attention_heads",
                  "num_hidden_layers", "hidden_size", "intermediate_size", "merge_kernel_size")


def moonvit_config(hf_config) -> MoonVitConfig:
    """Our encoder's config from vLLM's `KimiVLConfig`."""
    vision = hf_config.vision_config
    return MoonVitConfig(**{k: getattr(vision, k) for k in _VISION_FIELDS},
                         text_hidden_size=hf_config.text_config.hidden_size)


def _protocol_arguments(method: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The manager's arguments to a protocol method, by name, as the installed vLLM's protocol lays
    them out: the positions have moved between vLLM releases (e.g. `max_frames_per_batch`), the names
    we read have not."""
    signature = inspect.signature(getattr(SupportsEncoderCudaGraph, method))
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    return arguments


def _make(cls: type, **candidates: Any) -> Any:
    """Builds one of vLLM's protocol dataclasses from the fields the installed release has."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    required = {f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - candidates.keys())
    if missing:
        raise RuntimeError(f"this vLLM's {cls.__name__} requires {missing}, which fused-moonvit does not "
                           "know how to fill; set FUSED_MOONVIT_DISABLE=1 to use vLLM's own encoder")
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


@contextlib.contextmanager
def _fused_tower(config: MoonVitConfig) -> Iterator[list[FusedMoonVit]]:
    """While active, the two constructors `KimiVLForConditionalGeneration.__init__` builds its tower
    with hand out the halves of one `FusedMoonVit` instead, so vLLM's MoonVit is never built. The parent
    calls them inside its own `_mark_tower_model` context, so they are marked as the image tower. vLLM
    builds a model in one thread per process, and the names are restored as soon as it is built."""
    built: list[FusedMoonVit] = []

    def encoder() -> FusedMoonVit:
        if not built:
            built.append(FusedMoonVit(config))
        return built[0]

    saved = vllm_kimi_vl.MoonVitPretrainedModel, vllm_kimi_vl.KimiVLMultiModalProjector
    vllm_kimi_vl.MoonVitPretrainedModel = lambda *args, **kwargs: encoder().vision_tower
    vllm_kimi_vl.KimiVLMultiModalProjector = lambda *args, **kwargs: encoder().multi_modal_projector
    try:
        yield built
    finally:
        vllm_kimi_vl.MoonVitPretrainedModel, vllm_kimi_vl.KimiVLMultiModalProjector = saved


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

    def parameters(self):
        return self.encoder.parameters()

    def __call__(self, pixel_values: torch.Tensor, grid_hws) -> torch.Tensor:
        return self.encoder(pixel_values, grid_hws)


class FusedKimiVLForConditionalGeneration(vllm_kimi_vl.KimiVLForConditionalGeneration):
    """vLLM's Kimi-VL with the fused MoonVit encoder as its vision tower and projector."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        _refuse_sharded_encoder(vllm_config)
        with _fused_tower(moonvit_config(vllm_config.model_config.hf_config)) as built:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        if not built:
            raise RuntimeError(
                "vLLM's KimiVLForConditionalGeneration.__init__ no longer builds its tower through "
                "MoonVitPretrainedModel and KimiVLMultiModalProjector; this vLLM release is not supported "
                "(set FUSED_MOONVIT_DISABLE=1 to use vLLM's own encoder)")
        # Kept off the module tree, as vLLM's own StageMissingLayer keeps its wrapped module: its two
        # halves are already registered under the checkpoint's names, and a second registration would
        # give every encoder parameter a second name.
        self.__dict__["fused_encoder"] = built[0]
        self._dp_view = _DataParallelView(built[0])

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
                     buffer_keys=["pixel_values", PLAN_KEY], out_hidden_size=self.hidden_size)

    def get_encoder_cudagraph_item_specs(self, mm_kwargs: dict[str, Any]):
        return [_make(encoder_cudagraph_defs.EncoderItemSpec, input_size=h * w,
                      output_tokens=h * w // PATCHES_PER_TOKEN)
                for h, w in self._get_grid_hws(mm_kwargs)]

    def select_encoder_cudagraph_items(self, mm_kwargs: dict[str, Any], indices: list[int]) -> dict[str, Any]:
        # The grid stays on the host (vLLM keeps `image_grid_hws` on the CPU), so that building the
        # replay plan from it never waits on the device.
        grid = self._get_grid_hws(mm_kwargs)
        pixel_values = mm_kwargs["pixel_values"]
        offsets = patch_offsets(grid)
        parts = [pixel_values[offsets[i]:offsets[i + 1]] for i in indices]
        return {"pixel_values": torch.cat(parts) if parts else pixel_values[:0],
                "image_grid_hws": torch.tensor([grid[i] for i in indices], dtype=torch.long).view(-1, 2)}

    def prepare_encoder_cudagraph_capture_inputs(self, *args, **kwargs):
        a = _protocol_arguments("prepare_encoder_cudagraph_capture_inputs", args, kwargs)
        patches = PATCHES_PER_TOKEN * a["token_budget"]
        slots, device = a["max_batch_size"], a["device"]
        p = self.fused_encoder.config.patch_size
        self.fused_encoder.rope_table(device)  # built now: its first build copies from the host
        # An all-padding plan: nothing the graph records may depend on an image.
        plan = upload_plan(build_plan([], patches, slots), new_device_plan(slots, device), budget=patches)
        pixel_values = torch.zeros(patches, 3, p, p, device=device, dtype=a["dtype"])
        return _make(encoder_cudagraph_defs.EncoderCudaGraphCaptureInputs,
                     values={"pixel_values": pixel_values, PLAN_KEY: plan})

    def prepare_encoder_cudagraph_replay_buffers(self, *args, **kwargs):
        a = _protocol_arguments("prepare_encoder_cudagraph_replay_buffers", args, kwargs)
        mm_kwargs = a["mm_kwargs"]
        pixel_values = mm_kwargs["pixel_values"]
        grid = self._get_grid_hws(mm_kwargs)
        check_inputs(pixel_values, grid, self.fused_encoder.config.patch_size)
        # The graph's budget is not passed here; the plan is built to end at the last image, and
        # `encoder_cudagraph_forward` extends its trailing padding sequence to the budget.
        plan = build_plan(grid, pixel_values.shape[0], a["max_batch_size"])
        # Uploaded here, asynchronously from pinned memory, so that the manager's copy into the
        # captured buffer is device to device and no replay waits on the host.
        return _make(encoder_cudagraph_defs.EncoderCudaGraphReplayBuffers,
                     values={"pixel_values": pixel_values,
                             PLAN_KEY: plan.to(pixel_values.device, non_blocking=True)})

    def encoder_cudagraph_forward(self, *args, **kwargs) -> torch.Tensor:
        values = next(iter(_protocol_arguments("encoder_cudagraph_forward", args, kwargs).values()))
        pixel_values, plan = values["pixel_values"], values[PLAN_KEY]
        # Rows past the last image, up to the budget, form one padding sequence (their pixels are
        # whatever the buffer holds; the position-embedding kernel zeroes them, so they stay finite).
        plan_cu_seqlens(plan)[-1:].fill_(pixel_values.shape[0])
        return self.fused_encoder.forward_static(pixel_values, plan)

    def encoder_eager_forward(self, *args, **kwargs) -> torch.Tensor:
        mm_kwargs = _protocol_arguments("encoder_eager_forward", args, kwargs)["mm_kwargs"]
        return self.fused_encoder(mm_kwargs["pixel_values"], self._get_grid_hws(mm_kwargs))
