"""MoonVit for Kimi-VL: config, the eager reference, checkpoint loading and image preprocessing."""

from .checkpoint import CheckpointError, load_encoder_state
from .config import MoonVitConfig
from .loading import build_model
from .preprocess import preprocess_image, preprocess_images
from .reference import MoonVitReference

__all__ = [
    "CheckpointError",
    "MoonVitConfig",
    "MoonVitReference",
    "build_model",
    "load_encoder_state",
    "preprocess_image",
    "preprocess_images",
]
