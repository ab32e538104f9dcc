"""MoonVit for Kimi-VL and MoonViT3d for Kimi-K2.5 / K2.6 / K3: config, the eager reference, checkpoint
loading, and image and video preprocessing."""

from .checkpoint import CheckpointError, load_encoder_state
from .config import MoonVitConfig
from .loading import build_model, check_model_dir
from .preprocess import (ImageNote, KimiK25Inputs, load_image, preprocess_image, preprocess_images, read_frame_folder,
                         read_video_file)
from .reference import MoonVitReference

__all__ = [
    "CheckpointError",
    "FusedMoonVit",
    "ImageNote",
    "KimiK25Inputs",
    "MoonVitGraphRunner",
    "MoonVitConfig",
    "MoonVitReference",
    "build_model",
    "check_model_dir",
    "load_encoder_state",
    "load_image",
    "preprocess_image",
    "preprocess_images",
    "read_frame_folder",
    "read_video_file",
]


def __getattr__(name: str):
    # The fused classes pull in Triton; import them only when asked for, so that the reference path
    # (and TRITON_INTERPRET set later by a CPU user) are unaffected by merely importing this package.
    if name == "FusedMoonVit":
        from .fused import FusedMoonVit

        return FusedMoonVit
    if name == "MoonVitGraphRunner":
        from .runner import MoonVitGraphRunner

        return MoonVitGraphRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
