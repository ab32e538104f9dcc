"""What every fused-encoder drop-in for a vLLM Kimi model shares: `FusedEncoderDropIn`, a mixin placed
before vLLM's class (`class Ours(FusedEncoderDropIn, vLLMsKimiClass)`), and the helpers it is built from.

- Construction: the parent's `__init__` runs as it is, except that the names it builds its vision tower
  and projector with resolve, for this one call, to stand-ins that hand out the two halves of a single
  `FusedMoonVit` (`FusedTowerConstructors`, `parent_init_with`); nothing process-wide changes. Refused:
  a quantization config for the tower, a prefix other than the checkpoint's name for a half, and a
  weight-sharded encoder (tensor parallelism without `mm_encoder_tp_mode="data"`).
- Weights: the inherited loader, with a check that every encoder tensor of the checkpoint names one of
  the fused encoder's parameters.
- vLLM's `SupportsEncoderCudaGraph`: the buffers, replay values, padding logics and graph body are
  `encoder_graph`'s; the mixin adapts them to the installed release's protocol by feature detection (the
  dataclasses' fields and the protocol methods' parameter names), not by version checks.
- The eager path: the parent's eager hook encodes the parsed items (`encode_items`), with data
  parallelism (`mm_encoder_tp_mode="data"`) for items of any frame count: `encode_data_parallel`.

The subclasses (`kimi_vl.py`, `kimi_k25.py`, `kimi_k3.py`) name their family (`moonvit/families.py`) and
vLLM's class; which constructors, which config, which hook and where the grid sits are the family's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsEncoderCudaGraph
from vllm.v1.worker import encoder_cudagraph_defs

from fused_moonvit.integration import encoder_graph
from fused_moonvit.kernels.items import Items, grid_thw_list
from fused_moonvit.kernels.limits import MERGE_PATCHES
from fused_moonvit.moonvit.config import MoonVitConfig
from fused_moonvit.moonvit.families import UNSUPPORTED, Family
from fused_moonvit.moonvit.fused import FusedMoonVit


# The manager pops this key off `select_encoder_cudagraph_items`' result: the capture-axis keys of the batch.
AXIS_KEYS_KWARG = getattr(encoder_cudagraph_defs, "ENCODER_CUDAGRAPH_AXIS_KEYS_KWARG", None)


# -- the protocol, by feature detection --

@functools.cache
def protocol_signature(method: str) -> inspect.Signature:
    return inspect.signature(getattr(SupportsEncoderCudaGraph, method))


def protocol_arguments(method: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The manager's arguments to a protocol method, by name, as the installed vLLM's protocol lays
    them out: the positions have moved between vLLM releases (e.g. `max_frames_per_batch`), the names
    we read have not."""
    signature = protocol_signature(method)
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    return arguments


def dataclass_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def make(cls: type, **candidates: Any) -> Any:
    """Builds one of vLLM's protocol dataclasses from the fields the installed release has; candidates
    it lacks are left out (a release without `padding_logics` copies buffers its own way)."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    required = {f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - candidates.keys())
    if missing:
        raise RuntimeError(f"this vLLM's {cls.__name__} requires {missing}, which fused-moonvit does not "
                           f"know how to fill; {UNSUPPORTED}")
    names = {f.name for f in fields}
    return cls(**{k: v for k, v in candidates.items() if k in names})


def axes_supported() -> bool:
    """Whether the installed vLLM captures graphs along extra axes (`EncoderCudaGraphConfig.capture_axes`,
    with the keys of a batch returned under `AXIS_KEYS_KWARG`)."""
    return (AXIS_KEYS_KWARG is not None
            and "capture_axes" in dataclass_fields(encoder_cudagraph_defs.EncoderCudaGraphConfig)
            and "axis_keys" in protocol_signature("prepare_encoder_cudagraph_capture_inputs").parameters)


# -- construction --

def refuse_sharded_encoder(vllm_config: VllmConfig) -> None:
    mode = vllm_config.model_config.get_multimodal_config().mm_encoder_tp_mode
    tp = vllm_config.parallel_config.tensor_parallel_size
    if mode != "data" and tp > 1:
        raise ValueError(
            "fused-moonvit's encoder is not sharded across tensor-parallel ranks "
            f"(mm_encoder_tp_mode={mode!r}, tensor_parallel_size={tp}). Use mm_encoder_tp_mode=\"data\" "
            "(--mm-encoder-tp-mode data), which runs the encoder with full weights on every rank, each on "
            "its share of the items; or set FUSED_MOONVIT_DISABLE=1 to use vLLM's own encoder.")


@dataclasses.dataclass(frozen=True)
class EncoderAttentionFacts:
    """What vLLM's model classes read of a tower block's `attn` (vLLM's `MMEncoderAttention`), answered for
    the fused encoder, which sets one on each block: Kimi-K3's `__init__` reads
    `vision_tower.encoder.blocks[0].attn` to decide whether to warm up vLLM's FlashAttention-4 kernels for
    its tower. The fused encoder runs none of vLLM's attention backends, so there is nothing to warm up."""

    num_heads: int
    head_size: int
    is_flash_attn_backend: bool = False
    _fa_version: int | None = None


class FusedTowerConstructors:
    """Stand-ins for the constructors a vLLM model's `__init__` builds its tower with (`halves`: the
    constructor's name in the parent's module -> the attribute it assigns the result to, which is the
    checkpoint's name for those parameters). Each stand-in hands out one half of a single `FusedMoonVit`,
    built by `build_encoder`, so vLLM's tower is never built. The parent calls them inside its own
    `_mark_tower_model` context, so they are marked as its tower.

    The vision tower's `input_norm` (vLLM's module that normalises raw pixels on the device, where the
    parent passes one) is kept as `input_norm`, and registered where vLLM's own tower keeps it,
    `vision_tower.patch_embed.input_norm` (buffers only, none persistent): the parent's `.to()` of the
    tower then moves it, and casts its constants to the model's dtype, as it does vLLM's."""

    def __init__(self, config: MoonVitConfig, model_prefix: str, halves: Mapping[str, str], model_name: str,
                 build_encoder: Callable[[MoonVitConfig], FusedMoonVit]):
        self.config = config
        self.model_prefix = model_prefix
        self.halves = dict(halves)
        self.model_name = model_name
        self.build_encoder = build_encoder
        self.encoder: FusedMoonVit | None = None
        self.input_norm: torch.nn.Module | None = None
        self.built: list[str] = []

    def stand_in(self, attribute: str) -> Callable[..., torch.nn.Module]:
        """The stand-in for the constructor whose result the parent assigns to `attribute`. Its config
        arguments are the parent's (vLLM's or Hugging Face's vision config); the encoder is built from
        the `MoonVitConfig` derived from the same config."""
        if attribute not in self.halves.values():
            raise KeyError(f"{attribute!r} is not one of {sorted(self.halves.values())}")

        def construct(*config_args, prefix: str = "", quant_config=None, input_norm=None, **config_kwargs):
            return self._half(attribute, prefix, quant_config, input_norm)

        construct.__name__ = construct.__qualname__ = f"fused_{attribute}"
        return construct

    def _half(self, attribute: str, prefix: str, quant_config: object,
              input_norm: torch.nn.Module | None) -> torch.nn.Module:
        # The parent names each half's prefix after the attribute it assigns it to; the checkpoint's names
        # for our parameters are those attributes, so a different one is a layout we do not know.
        expected = f"{self.model_prefix}.{attribute}" if self.model_prefix else attribute
        if prefix != expected:
            raise RuntimeError(f"vLLM's {self.model_name} builds its {attribute} under the prefix {prefix!r}, "
                               f"not {expected!r}; this vLLM release is not supported ({UNSUPPORTED})")
        # The fused kernels run on plain bf16/fp16/fp32 weights only. (vLLM 0.33 and 0.34 build Kimi-VL's
        # tower without a quantization config, and Kimi-K2.5's without a compressed-tensors one.)
        if quant_config is not None:
            raise ValueError(f"fused-moonvit's encoder runs unquantized vision weights only, but vLLM asks for "
                             f"its {attribute} quantized ({type(quant_config).__name__}); {UNSUPPORTED}")
        if self.encoder is None:
            self.encoder = self.build_encoder(self.config)
            facts = EncoderAttentionFacts(self.config.num_attention_heads, self.config.head_dim)
            for block in self.encoder.vision_tower.encoder.blocks:
                block.attn = facts  # a plain attribute: not a module, no parameters
        if input_norm is not None:
            self.input_norm = input_norm
            self.encoder.vision_tower.patch_embed.input_norm = input_norm
        self.built.append(attribute)
        return getattr(self.encoder, attribute)


def parent_init_with(parent: type, constructors: FusedTowerConstructors) -> Callable[..., None]:
    """`parent.__init__`, with its tower constructors resolved to `constructors`' stand-ins, for this
    one call.

    The function runs with a copy of its module's globals in which the constructor names are ours:
    nothing process-wide changes, so a stock model built meanwhile (another thread, another model) gets
    vLLM's own tower."""
    init = parent.__init__
    names = constructors.halves
    module = inspect.getmodule(parent)
    if (not isinstance(init, types.FunctionType) or module is None or init.__globals__ is not vars(module)
            or not set(names) <= set(init.__code__.co_names)):
        raise RuntimeError(f"vLLM's {parent.__name__}.__init__ no longer builds its tower through "
                           f"{' and '.join(names)}; this vLLM release is not supported ({UNSUPPORTED})")
    scope = dict(init.__globals__)
    for name, attribute in names.items():
        scope[name] = constructors.stand_in(attribute)
    rebound = types.FunctionType(init.__code__, scope, init.__name__, init.__defaults__, init.__closure__)
    rebound.__kwdefaults__ = init.__kwdefaults__
    return rebound


# -- data parallelism --

def encode_data_parallel(encode: Callable[[torch.Tensor, list[list[int]]], torch.Tensor],
                         pixel_values: torch.Tensor, items: Items | Sequence[Sequence[int]], hidden_size: int,
                         dtype: torch.dtype) -> list[torch.Tensor]:
    """Runs `encode` (pixels, (t, h, w) grid -> (sum h/2 * w/2, hidden_size)) on this rank's share of the
    items (an `Items`, or their grid), balanced by patches across the tensor-parallel group, and
    all-gathers the outputs: per item, in input order, (h/2 * w/2, hidden_size).

    vLLM's `run_dp_sharded_mrope_vision_model` does this for towers whose items yield t * h * w / 4
    outputs; MoonViT3d's video chunks yield h/2 * w/2 (their frames are averaged), so it would cut their
    outputs at the wrong rows.
    """
    from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                                  tensor_model_parallel_all_gather)
    from vllm.model_executor.models.vision import get_load_balance_assignment

    items = Items.of(items)
    world, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    order, counts, _ = get_load_balance_assignment([t * h * w for t, h, w in items], world)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    per_rank = [order[starts[r]:starts[r + 1]] for r in range(world)]
    tokens = items.tokens
    rank_tokens = [sum(tokens[i] for i in share) for share in per_rank]
    width = max(rank_tokens, default=0)

    mine = per_rank[rank]
    if mine:
        local_pixels, _ = encoder_graph.select_items(pixel_values, items.rows, mine)
        local = encode(local_pixels, items.pick(mine))
    else:
        local = torch.empty(0, hidden_size, device=pixel_values.device, dtype=dtype)
    if local.shape[0] < width:  # all_gather needs one shape on every rank
        local = torch.cat([local, local.new_zeros(width - local.shape[0], hidden_size)])
    gathered = tensor_model_parallel_all_gather(local, dim=0)

    results: list[torch.Tensor | None] = [None] * len(items)
    for r, share in enumerate(per_rank):
        rows = gathered[r * width: r * width + rank_tokens[r]]
        for i, part in zip(share, rows.split([tokens[i] for i in share])):
            results[i] = part
    return results


# -- the mixin --

def _mapper_keeping_encoder_names(mapper, halves: Iterable[str]):
    """vLLM's weight-name mapper without its renames of encoder names (Kimi-K2.5's and K3's rename the
    projector's `proj.0`/`proj.2`, which ours keeps); every other rule stays."""
    prefixes = tuple(f"{half}." for half in halves)
    kept = {k: v for k, v in mapper.orig_to_new_prefix.items() if not k.startswith(prefixes)}
    return dataclasses.replace(mapper, orig_to_new_prefix=kept)


def vllm_class(family: Family) -> type:
    """vLLM's class a family's drop-in replaces, where its declaration says it lives."""
    return getattr(importlib.import_module(family.vllm.module), family.vllm.class_name)


class FusedEncoderDropIn:
    """Mixin for a vLLM Kimi model class: `class Ours(FusedEncoderDropIn, vllm_class(FAMILY))`, whose body names
    its `family` only; everything else is derived from the family's declaration when the class is made:
    the parent, the weight mapper, and the parent's eager hook (`family.vllm.eager_hook`), which becomes
    `encode_items`."""

    family: ClassVar[Family]
    # vLLM's class, whose __init__ builds the model: the base after this mixin.
    vllm_class: ClassVar[type]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.family.vllm
        bases = cls.__bases__
        if bases != (FusedEncoderDropIn, vllm_class(cls.family)):
            raise TypeError(f"{cls.__name__} must be declared as (FusedEncoderDropIn, vllm_class(family)), "
                            f"vLLM's {declared.module}.{declared.class_name} being the second base")
        cls.vllm_class = bases[1]
        mapper = getattr(cls.vllm_class, "hf_to_vllm_mapper", None)
        if mapper is not None:
            cls.hf_to_vllm_mapper = _mapper_keeping_encoder_names(mapper, declared.tower_constructors.values())
        setattr(cls, declared.eager_hook, FusedEncoderDropIn.encode_items)

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_sharded_encoder(vllm_config)
        parent, halves = self.vllm_class, self.family.vllm.tower_constructors
        constructors = FusedTowerConstructors(self.family.moonvit_config(vllm_config.model_config.hf_config), prefix,
                                              halves, parent.__name__, lambda config: FusedMoonVit(config))
        parent_init_with(parent, constructors)(self, vllm_config=vllm_config, prefix=prefix)
        if sorted(constructors.built) != sorted(halves.values()):
            raise RuntimeError(f"vLLM's {parent.__name__}.__init__ built {constructors.built} of the tower, "
                               f"not each of {list(halves.values())} once; this vLLM release is "
                               f"not supported ({UNSUPPORTED})")
        # Kept off the module tree, as vLLM's own StageMissingLayer keeps its wrapped module: its two
        # halves are already registered under the checkpoint's names, and a second registration would
        # give every encoder parameter a second name.
        self.__dict__["fused_encoder"] = constructors.encoder
        # Registered in the tower already (FusedTowerConstructors); this is a plain reference.
        self.__dict__["_input_norm"] = constructors.input_norm
        self._frame_factors = self._graph_frame_factors()
        mapper = getattr(self, "hf_to_vllm_mapper", None)
        renamed = [] if mapper is None else sorted(
            name for name in self._encoder_parameter_names() if mapper.map_name(name) != name)
        if renamed:
            raise RuntimeError(f"this vLLM's weight-name mapper for {parent.__name__} renames encoder parameters "
                               f"({renamed[:3]}...), which the fused encoder keeps under the checkpoint's names; "
                               f"this vLLM release is not supported ({UNSUPPORTED})")

    def _encoder_parameter_names(self) -> set[str]:
        return {f"{half}.{name}" for half in self.family.vllm.tower_constructors.values()
                for name, _ in getattr(self.fused_encoder, half).named_parameters()}

    # -- eager path (embed_multimodal) --

    def encode_items(self, parsed) -> list[torch.Tensor]:
        """The parent's eager hook (`family.vllm.eager_hook`): per item, (h/2 * w/2, text hidden), from
        the parent's parsed input (pixels, and the grid under `family.vllm.grid_key`); across the
        tensor-parallel group in data-parallel mode."""
        pixel_values = parsed["pixel_values"]
        items = Items.of(self.grid_of(parsed), max_frames=self.fused_encoder.config.max_frames)
        if self.use_data_parallel:
            return encode_data_parallel(self.encode, pixel_values, items, self.fused_encoder.config.output_size,
                                        self.fused_encoder.dtype)
        return list(self.encode(pixel_values, items).split(list(items.tokens)))

    # -- input normalisation --

    @property
    def pixel_input_dtype(self) -> torch.dtype | None:
        """The dtype the pixels arrive in where it is not the model's (uint8 for raw pixels)."""
        norm = self.__dict__.get("_input_norm")
        return None if norm is None else getattr(norm, "input_dtype", None)

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's pixels: vLLM's input normalisation, as its own tower applies it (flattened per
        patch, computed in fp32, returned in the model's dtype), or the pixels as they are."""
        norm = self.__dict__.get("_input_norm")
        if norm is None:
            return pixel_values
        return norm(pixel_values.flatten(1), self.fused_encoder.dtype).view(pixel_values.shape)

    def encode(self, pixel_values: torch.Tensor, items) -> torch.Tensor:
        """The fused encoder's eager forward: (sum h/2 * w/2, text hidden) for these items (an `Items`, or
        vLLM's grid, which the forward validates)."""
        return self.fused_encoder(self.normalize_pixels(pixel_values), items)

    # -- weights --

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        prefixes = tuple(f"{half}." for half in self.family.vllm.tower_constructors.values())
        encoder_names = self._encoder_parameter_names()

        def checked(weights):
            for name, tensor in weights:
                if name.startswith(prefixes) and name not in encoder_names:
                    raise ValueError(f"the checkpoint has {name!r}, which the fused encoder does not have: "
                                     "fused-moonvit loads unquantized vision weights only, under the "
                                     f"checkpoint's names; {UNSUPPORTED}")
                yield name, tensor

        return super().load_weights(checked(weights))

    # -- SupportsEncoderCudaGraph --

    def _graph_frame_factors(self) -> tuple[int, ...] | None:
        """None for an images-only model (one graph per budget); else the frame factors of the graphs:
        one capture axis where vLLM has them, else the largest factor alone (every budget then holds
        4 x max_frames patches per output token)."""
        if self.family.tower != "moonvit3d":
            return None
        factors = encoder_graph.frame_factors(self.fused_encoder.config.max_frames)
        return factors if axes_supported() else factors[-1:]

    def grid_of(self, mm_kwargs: Mapping[str, Any]) -> list[list[int]]:
        grid = mm_kwargs[self.family.vllm.grid_key]
        return [[int(v) for v in row] for row in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]

    def get_encoder_cudagraph_config(self):
        candidates = dict(modalities=list(self.family.vllm.modalities), buffer_keys=list(encoder_graph.BUFFER_KEYS),
                          out_hidden_size=self.fused_encoder.config.output_size,
                          padding_logics=dict(encoder_graph.PADDING_LOGICS))
        if self._frame_factors is not None and axes_supported():
            candidates["capture_axes"] = (self._frame_factors,)
        return make(encoder_cudagraph_defs.EncoderCudaGraphConfig, **candidates)

    def get_encoder_cudagraph_item_specs(self, mm_kwargs: dict[str, Any]):
        return [make(encoder_cudagraph_defs.EncoderItemSpec, input_size=t * h * w,
                     output_tokens=h * w // MERGE_PATCHES)
                for t, h, w in grid_thw_list(self.grid_of(mm_kwargs))]

    def select_encoder_cudagraph_items(self, mm_kwargs: dict[str, Any], indices: list[int]) -> dict[str, Any]:
        grid = self.grid_of(mm_kwargs)
        pixel_values, selected = encoder_graph.select_items(mm_kwargs["pixel_values"], grid, indices)
        # The grid stays on the host (vLLM keeps it on the CPU), so that building the replay plan from it
        # never waits on the device.
        width = len(grid[0]) if grid else (3 if self.family.tower == "moonvit3d" else 2)
        out = {"pixel_values": pixel_values,
               self.family.vllm.grid_key: torch.tensor(selected, dtype=torch.long).view(-1, width)}
        if self._frame_factors is not None and axes_supported():
            out[AXIS_KEYS_KWARG] = (encoder_graph.frame_factor(selected, self._frame_factors),)
        return out

    def prepare_encoder_cudagraph_capture_inputs(self, *args, **kwargs):
        a = protocol_arguments("prepare_encoder_cudagraph_capture_inputs", args, kwargs)
        frames = None
        if self._frame_factors is not None:
            keys = a.get("axis_keys") or ()
            frames = keys[0] if keys else self._frame_factors[-1]
            if frames not in self._frame_factors:
                raise ValueError(f"vLLM asks for a graph of frame factor {frames!r}, not one of the model's "
                                 f"{self._frame_factors}")
        values = encoder_graph.capture_buffers(self.fused_encoder, a["token_budget"], a["max_batch_size"],
                                               a["device"], self.pixel_input_dtype or a["dtype"], frames)
        return make(encoder_cudagraph_defs.EncoderCudaGraphCaptureInputs, values=values)

    def prepare_encoder_cudagraph_replay_buffers(self, *args, **kwargs):
        a = protocol_arguments("prepare_encoder_cudagraph_replay_buffers", args, kwargs)
        mm_kwargs = a["mm_kwargs"]
        values = encoder_graph.replay_values(self.fused_encoder, mm_kwargs["pixel_values"], self.grid_of(mm_kwargs),
                                             a["max_batch_size"])
        return make(encoder_cudagraph_defs.EncoderCudaGraphReplayBuffers, values=values)

    def encoder_cudagraph_forward(self, *args, **kwargs) -> torch.Tensor:
        values = next(iter(protocol_arguments("encoder_cudagraph_forward", args, kwargs).values()))
        normalize = self.normalize_pixels if self.__dict__.get("_input_norm") is not None else None
        return encoder_graph.graph_forward(self.fused_encoder, values, normalize)

    def encoder_eager_forward(self, *args, **kwargs) -> torch.Tensor:
        mm_kwargs = protocol_arguments("encoder_eager_forward", args, kwargs)["mm_kwargs"]
        return self.encode(mm_kwargs["pixel_values"], self.grid_of(mm_kwargs))
