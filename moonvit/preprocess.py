"""Image and video preprocessing (docs/design.md section 1.2): Kimi-VL's images here, by hand; Kimi-K2.5's images
and video chunks through transformers' own processors."""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from fused_moonvit.kernels.limits import MAX_GRID_SIDE, MERGE_SIDE

PATCH_SIZE = 14
IN_TOKEN_LIMIT_INSTRUCT = 4096
IN_TOKEN_LIMIT_THINKING = 16384
MEAN = STD = 0.5


class ImageNote(UserWarning):
    """An image changed on its way to RGB in a way its file does not show: only its first frame kept, its
    16-bit values clipped to 8 bits... (`load_image`). vLLM changes it the same way; this says so."""


# vLLM composites these modes, and any image whose info names a transparent colour, onto white; every other
# mode goes through Pillow's own RGB conversion (RGBa and La, premultiplied, included: vLLM treats them so).
_ALPHA_MODES = ("RGBA", "LA", "PA")
_WIDE = {"u": "integer", "i": "integer", "f": "float"}


def _percent(fraction: float) -> str:
    return "under 1%" if 0 < fraction < 0.005 else f"{fraction:.0%}"


def _read(image) -> tuple[Image.Image, list[tuple[str, str]]]:
    """(the RGB image vLLM hands a model's processor, [(kind, note)] on what changed unseen)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return _upright_rgb(opened)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
    return _upright_rgb(image)


def _upright_rgb(image: Image.Image) -> tuple[Image.Image, list[tuple[str, str]]]:
    notes = []
    frames = getattr(image, "n_frames", 1)
    # An MPO file's later frames are not more of the picture but a preview, another view or an HDR gain
    # map (Android's Ultra HDR photos), so keeping its first frame, the picture itself, changes nothing seen.
    if frames > 1 and image.format != "MPO":
        which = "the first" if image.tell() == 0 else f"frame {image.tell()} (counting from 0), the one it is at,"
        notes.append(("frames", f"holds {frames} frames (an animated or multi-page image); only {which} is "
                                f"encoded, as vLLM encodes it"))
    image.load()  # a file that cannot be decoded fails here, with Pillow's own message
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as err:  # vLLM too keeps the image as stored when its EXIF data cannot be applied
        upright = image.copy()
        upright.info.pop("exif", None)  # so that nothing downstream tries it again
        notes.append(("exif", f"its EXIF orientation cannot be applied ({err}); it is encoded as stored, as vLLM "
                              f"encodes it"))
    if upright.mode in _ALPHA_MODES or "transparency" in upright.info:
        # Transparent pixels show the white background, as vLLM's default rgba_background_color.
        rgba = upright if upright.mode == "RGBA" else upright.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb, notes
    values = np.asarray(upright) if upright.mode in ("I", "F") or upright.mode.startswith("I;16") else None
    if values is not None:
        # Pillow's conversion to 8 bits clips to 0..255 and truncates fractions; it does not rescale.
        changed = (values < 0) | (values > 255)
        if values.dtype.kind == "f":
            changed |= np.floor(values) != values
        if changed.any():
            bits = values.dtype.itemsize * 8
            depth = f"{bits}-bit {_WIDE[values.dtype.kind]}"
            fractions = " and dropping fractions" if values.dtype.kind == "f" else ""
            notes.append(("bits", f"{depth} grayscale ({upright.mode}): "
                                  f"converted to 8 bits as vLLM converts it, clipping values to 0..255{fractions}, "
                                  f"which changes {_percent(changed.mean())} of its pixels (values above 255 become "
                                  f"white); to keep its contrast, scale it to 0..255 before encoding or serving it"))
    try:
        return (upright if upright.mode == "RGB" else upright.convert("RGB")), notes
    except ValueError as err:
        raise ValueError(f"its pixels, of mode {upright.mode}, cannot be converted to RGB ({err})") from None


def _caller_level() -> int:
    """The `stacklevel` of the first caller outside this package, so that a warning names the user's line."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("fused_moonvit."):
        level, frame = level + 1, frame.f_back
    return level


def _tell(texts: list[str], notes: list[str] | None, name: str) -> None:
    """Appends `texts` to `notes`, or without `notes` warns each as an `ImageNote` naming `name`, at the
    caller's line."""
    if notes is not None:
        notes.extend(texts)
    else:
        for text in texts:
            warnings.warn(f"{name}: {text}", ImageNote, stacklevel=_caller_level())


def load_image(image: Image.Image | str | os.PathLike, notes: list[str] | None = None) -> Image.Image:
    """An image (PIL or path) as vLLM hands it to a model's processor, for every path of this package.

    Its EXIF orientation is applied, as an image viewer shows it; of an animated or multi-page image,
    only the frame it is at (a file's first) is kept; transparent pixels become white; other modes go
    through Pillow's RGB conversion, which clips 16- and 32-bit values to 0..255. What changed unseen
    (more than one frame, values clipped, EXIF that cannot be applied) is appended to `notes`, each note
    a sentence without the image's name, or without `notes` warned as an `ImageNote` that names it."""
    rgb, said = _read(image)
    _tell([text for _, text in said], notes, os.fspath(image) if isinstance(image, (str, os.PathLike)) else "image")
    return rgb


def fit_to_limit(image: Image.Image, in_token_limit: int, patch_size: int = PATCH_SIZE) -> Image.Image:
    """Scales both sides by sqrt(limit / n) with Pillow's bicubic when n full patches exceed the limit."""
    w, h = image.size
    n = (w // patch_size) * (h // patch_size)
    if n <= in_token_limit:
        return image
    scale = math.sqrt(in_token_limit / n)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def preprocess_image(image, in_token_limit: int = IN_TOKEN_LIMIT_INSTRUCT, patch_size: int = PATCH_SIZE
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> ((h*w, 3, p, p) fp32 patches row-major, (h, w) in patches)."""
    if in_token_limit < 1:
        raise ValueError(f"in_token_limit must be >= 1, got {in_token_limit}")
    image = fit_to_limit(load_image(image), in_token_limit, patch_size)
    w, h = image.size
    unit = patch_size * MERGE_SIDE
    padded_w, padded_h = -(-w // unit) * unit, -(-h // unit) * unit
    gh, gw = padded_h // patch_size, padded_w // patch_size
    if gh > MAX_GRID_SIDE or gw > MAX_GRID_SIDE:
        raise ValueError(f"image of {w}x{h} px needs a {gh}x{gw} patch grid after scaling, but a side may have "
                         f"at most {MAX_GRID_SIDE} patches (the aspect ratio is too extreme)")
    # Pad right and bottom with black before normalising, as the processor pads the PIL image.
    pixels = np.zeros((padded_h, padded_w, 3), dtype=np.float32)
    pixels[:h, :w] = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - MEAN) / STD
    patches = torch.from_numpy(pixels).view(gh, patch_size, gw, patch_size, 3).permute(0, 2, 4, 1, 3)
    return patches.reshape(gh * gw, 3, patch_size, patch_size).contiguous(), (gh, gw)


def preprocess_images(images: Iterable, in_token_limit: int = IN_TOKEN_LIMIT_INSTRUCT, patch_size: int = PATCH_SIZE
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (PIL or paths) -> (pixel_values (sum h*w, 3, p, p) fp32, grid_hws (n, 2) int64)."""
    outs = [preprocess_image(im, in_token_limit, patch_size) for im in images]
    if not outs:
        raise ValueError("no image given")
    return torch.cat([p for p, _ in outs]), torch.tensor([g for _, g in outs], dtype=torch.int64)


def tokens_per_image(grid_hws: torch.Tensor | Sequence[Sequence[int]]) -> list[int]:
    """Output tokens of each image: (h/2) * (w/2)."""
    return [(int(h) // MERGE_SIDE) * (int(w) // MERGE_SIDE) for h, w in torch.as_tensor(grid_hws).tolist()]


# --- Kimi-K2.5 / K2.6 / K3 (MoonViT3d): transformers' own processors --------------------------------------
#
# Images and video chunks of a MoonViT3d model are prepared by transformers' Kimi_K25ImageProcessor and
# Kimi_K25VideoProcessor, built here from the model directory's processor files, without remote code or
# downloads. Their outputs are (patches (N, 3, p, p), grid_thw (n, 3)), patches frame-major, then
# row-major, each channel-first: the tower's layout (docs/design.md section 1.2).

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
# The remote-code processor's settings (`media_proc_cfg`), as Kimi-K2.5's and K2.6's checkpoints ship them.
_LEGACY_KEYS = ("in_patch_limit", "patch_limit_on_one_side", "in_patch_limit_each_frame", "temporal_merge_kernel_size",
                "sample_fps", "merge_kernel_size", "in_patch_limit_video", "max_num_frames_each_video",
                "fixed_output_tokens")


class ProcessorUnavailable(ImportError):
    """transformers' Kimi-K2.5 processors, or a package they need, cannot be imported here."""


def _processor_classes():
    try:
        from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor
        from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor
    except ImportError as err:
        import transformers

        from .families import titles, video_families

        what = f"{titles(video_families())} inputs are prepared by transformers' Kimi_K25ImageProcessor, which"
        missing = getattr(err, "name", None)
        if missing and missing.split(".")[0] == "torchvision":
            raise ProcessorUnavailable(f"{what} needs torchvision: pip install torchvision (or this package's k25 "
                                       f"extra)") from err
        raise ProcessorUnavailable(f"{what} transformers {transformers.__version__} lacks ({err}); install a "
                                   f"release with Kimi-K2.5 support (5.22 is tested)") from err
    return Kimi_K25ImageProcessor, Kimi_K25VideoProcessor


def _read_json(path: str) -> dict:
    import json

    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _from_legacy(cfg: dict, where: str) -> tuple[dict, dict, dict]:
    """(image kwargs, video kwargs, extras) from the remote-code processor's `media_proc_cfg`. The extras
    are the two video limits transformers' processor has no option for, applied by this module."""
    if cfg.get("fixed_output_tokens") is not None:
        raise ValueError(f"{where}: fixed_output_tokens={cfg['fixed_output_tokens']!r} has no equivalent in "
                         f"transformers' Kimi-K2.5 processors; only null is supported")
    shared = {}
    if cfg.get("patch_size") is not None:
        shared["patch_size"] = int(cfg["patch_size"])
    if cfg.get("merge_kernel_size") is not None:
        merge = cfg["merge_kernel_size"]
        shared["merge_size"] = int(merge[0] if isinstance(merge, (list, tuple)) else merge)
    for name in ("image_mean", "image_std"):
        if cfg.get(name) is not None:
            shared[name] = list(cfg[name])
    if cfg.get("patch_limit_on_one_side") is not None:
        side = int(cfg["patch_limit_on_one_side"])
        shared["size"] = {"max_height": side, "max_width": side}
    image, video = dict(shared), dict(shared)
    if cfg.get("in_patch_limit") is not None:
        image["max_patches"] = int(cfg["in_patch_limit"])
    per_frame = cfg.get("in_patch_limit_each_frame", None)
    if per_frame is None:
        per_frame = cfg.get("in_patch_limit")
    if per_frame is not None:
        video["max_patches"] = int(per_frame)
    if cfg.get("temporal_merge_kernel_size") is not None:
        video["temporal_patch_size"] = int(cfg["temporal_merge_kernel_size"])
    if cfg.get("sample_fps") is not None:
        video["fps"] = float(cfg["sample_fps"])
    extras = {"video_patch_limit": cfg.get("in_patch_limit_video"),
              "max_frames_per_video": cfg.get("max_num_frames_each_video")}
    return image, video, {k: (None if v is None else int(v)) for k, v in extras.items()}


def _native(cfg: dict, cls) -> dict:
    """The keys of a processor file that `cls` takes as settings."""
    valid = set(cls.valid_kwargs.__annotations__) - {"return_tensors", "device", "video_metadata", "data_format",
                                                     "input_data_format"}
    return {k: v for k, v in cfg.items() if k in valid}


class KimiK25Inputs:
    """transformers' Kimi-K2.5 image and video processors, with the settings of a model directory.

    Settings come from the directory's `preprocessor_config.json` (images; its `media_proc_cfg`, the
    layout Kimi-K2.5 and K2.6 ship for their remote-code processor, sets videos too) and
    `video_preprocessor_config.json` (videos), or `processor_config.json`'s `image_processor` and
    `video_processor` where those files are absent; a directory with none of them, or `model_dir=None`,
    gets the processor classes' defaults (Kimi-K2.5's), and a directory that does not exist is refused.
    Native keys (`max_patches`, `size`, ...) win over `media_proc_cfg`'s. Nothing is downloaded and no
    remote code runs.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None):
        if model_dir is not None and not os.path.isdir(model_dir):
            from .families import titles, video_families

            missing = not os.path.exists(model_dir)
            raise (FileNotFoundError if missing else NotADirectoryError)(
                f"model directory {os.fspath(model_dir)!r} {'does not exist' if missing else 'is not a directory'}; "
                f"give the local directory of a {titles(video_families())} model, or None for the processors' "
                f"defaults")
        image_cls, video_cls = _processor_classes()
        image_kwargs, video_kwargs = {}, {}
        self.video_patch_limit = None      # media_proc_cfg.in_patch_limit_video: patches over a whole video
        self.max_frames_per_video = None   # media_proc_cfg.max_num_frames_each_video
        sources = []
        if model_dir is not None:
            model_dir = os.fspath(model_dir)
            nested = {}
            if os.path.isfile(os.path.join(model_dir, PROCESSOR_FILE)):
                nested = _read_json(os.path.join(model_dir, PROCESSOR_FILE))
            image_cfg = video_cfg = None
            image_path = os.path.join(model_dir, IMAGE_PROCESSOR_FILE)
            if os.path.isfile(image_path):
                image_cfg, image_where = _read_json(image_path), image_path
            elif isinstance(nested.get("image_processor"), dict):
                image_cfg, image_where = nested["image_processor"], f"{PROCESSOR_FILE} image_processor"
            video_path = os.path.join(model_dir, VIDEO_PROCESSOR_FILE)
            if os.path.isfile(video_path):
                video_cfg, video_where = _read_json(video_path), video_path
            elif isinstance(nested.get("video_processor"), dict):
                video_cfg, video_where = nested["video_processor"], f"{PROCESSOR_FILE} video_processor"
            if image_cfg is not None:
                legacy = image_cfg.get("media_proc_cfg")
                if legacy is None and any(k in image_cfg for k in _LEGACY_KEYS):
                    legacy = image_cfg
                if isinstance(legacy, dict):
                    image_kwargs, video_kwargs, extras = _from_legacy(legacy, image_where)
                    self.video_patch_limit = extras["video_patch_limit"]
                    self.max_frames_per_video = extras["max_frames_per_video"]
                    sources.append(f"{image_where} (media_proc_cfg: images and videos)")
                else:
                    sources.append(image_where)
                image_kwargs.update(_native(image_cfg, image_cls))
            if video_cfg is not None:
                video_kwargs.update(_native(video_cfg, video_cls))
                sources.append(video_where)
        try:
            self.image = image_cls(**image_kwargs)
            self.video = video_cls(**video_kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"the processor settings of {', '.join(sources)} do not build transformers' "
                             f"Kimi-K2.5 processors: {err}") from None
        self.source = ", ".join(sources) if sources else "the processor classes' defaults"

    def check_model(self, patch_size: int, max_frames: int) -> None:
        """Raises if the processors' patches or chunks do not fit a model of this patch size and time table."""
        for name, proc in (("image", self.image), ("video", self.video)):
            if proc.patch_size != patch_size:
                raise ValueError(f"the {name} processor cuts {proc.patch_size}-pixel patches ({self.source}), but the "
                                 f"model's patch_size is {patch_size}")
            if proc.merge_size != MERGE_SIDE:
                raise ValueError(f"the {name} processor's merge_size is {proc.merge_size} ({self.source}); the "
                                 f"encoder merges 2x2")
        if self.video.temporal_patch_size > max_frames:
            raise ValueError(f"the video processor groups {self.video.temporal_patch_size} frames per chunk "
                             f"({self.source}), but the model's time embedding has {max_frames} frames")

    @property
    def frames_per_chunk(self) -> int:
        return int(self.video.temporal_patch_size)

    def image_inputs(self, image, max_patches: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image (PIL or path) -> ((h*w, 3, p, p) fp32 patches, (1, h, w))."""
        kwargs = {} if max_patches is None else {"max_patches": int(max_patches)}
        out = self.image(images=[load_image(image)], return_tensors="pt", **kwargs)
        (grid,) = out["image_grid_thw"].tolist()
        return out["pixel_values"].float().contiguous(), tuple(int(v) for v in grid)

    def video_inputs(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A video's sampled frames, (T, H, W, 3) uint8 RGB -> (patches (sum t*h*w, 3, p, p) fp32, grid_thws
        (chunks, 3)): chunks of `frames_per_chunk` frames (the last may hold fewer), frame-major patches."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
            raise ValueError(f"expected frames of shape (T, H, W, 3) with T >= 1, got {tuple(frames.shape)}")
        kwargs = {}
        if self.video_patch_limit is not None:
            # media_proc_cfg.in_patch_limit_video shares one budget among a video's frames.
            per_frame = min(round(self.video_patch_limit / frames.shape[0]), int(self.video.max_patches))
            kwargs["max_patches"] = max(1, per_frame)
        out = self.video(videos=[frames], do_sample_frames=False, return_tensors="pt", **kwargs)
        return out["pixel_values_videos"].float().contiguous(), out["video_grid_thw"].to(torch.int64)

    def sample_indices(self, total_frames: int, fps: float) -> list[int]:
        """Which frames of a video of `total_frames` at `fps` the video processor samples (its `fps`, 2 for
        Kimi-K2.5). A video slower than that keeps every frame (transformers would refuse it)."""
        from transformers.video_utils import VideoMetadata

        metadata = VideoMetadata(total_num_frames=int(total_frames), fps=float(fps),
                                 duration=total_frames / fps, video_backend="pyav")
        if self.video.fps is not None and fps <= self.video.fps:
            indices = list(range(total_frames))
        else:
            indices = [int(i) for i in self.video.sample_frames(metadata)]
        if self.max_frames_per_video is not None and len(indices) > self.max_frames_per_video:
            indices = [int(i) for i in self.video.sample_frames(metadata, num_frames=self.max_frames_per_video)]
        return indices


# --- Video input: a folder of frames, or a file decoded with PyAV --------------------------------------------

def frame_files(folder: str | os.PathLike) -> list[str]:
    """The frame images of `folder`, sorted by name (hidden files skipped). Every other entry is an error."""
    folder = os.fspath(folder)
    extensions = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    frames = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.splitext(name)[1].lower() not in extensions:
            raise ValueError(f"frame folder {folder} holds {name}, which is not an image file; a frame folder "
                             f"holds only the frames, as image files sorted by name")
        frames.append(path)
    if not frames:
        raise ValueError(f"frame folder {folder} holds no frame images")
    return frames


def read_frame_folder(folder: str | os.PathLike, notes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(frames (T, H, W, 3) uint8 RGB, their file names): every frame of the folder, in name order, each
    read by `load_image`. Its notes are gathered by kind over the frames, naming the first frame of each
    kind and how many more share it; appended to `notes`, or warned as `ImageNote`s naming the folder."""
    paths = frame_files(folder)
    frames, kinds = [], {}
    for path in paths:
        try:
            image, said = _read(path)
        except OSError as err:
            raise ValueError(f"frame {path} cannot be read: {err}") from None
        except ValueError as err:
            raise ValueError(f"frame {path}: {err}") from None
        if frames and image.size != (frames[0].shape[1], frames[0].shape[0]):
            raise ValueError(f"frame {path} is {image.size[0]}x{image.size[1]} px, but {paths[0]} is "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]}: a video's frames share one size")
        frames.append(np.asarray(image, dtype=np.uint8))
        for kind, text in said:
            kinds.setdefault(kind, []).append((os.path.basename(path), text))
    gathered = []
    for shared in kinds.values():
        (first, text), more = shared[0], len(shared) - 1
        gathered.append(f"frame {first}" + (f" (and {more} more like it)" if more else "") + f": {text}")
    _tell(gathered, notes, os.fspath(folder))
    return np.stack(frames), [os.path.basename(p) for p in paths]


PYAV_MISSING = "decoding a video file needs PyAV, which is not installed: pip install av (or give a folder of its frames)"


def pyav_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def read_video_file(path: str | os.PathLike, sample: "Callable[[int, float], list[int]]", progress=None
                    ) -> tuple[np.ndarray, list[int], float]:
    """Decodes the frames `sample(total_frames, fps)` picks from the video file `path` with PyAV:
    ((T, H, W, 3) uint8 RGB frames, their indices, the video's frame rate). `progress`, if given, is
    called with the number of frames decoded so far."""
    try:
        import av
    except ImportError:
        raise ImportError(PYAV_MISSING) from None
    path = os.fspath(path)
    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        raise ValueError(f"{path} is not a video PyAV can open: {err}") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} holds no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError(f"{path}: the video stream states no frame rate")
        fps = float(rate)
        total = int(stream.frames or 0)
        if total <= 0:  # some containers do not count their frames: count them
            total = sum(1 for _ in container.decode(stream))
            container.seek(0)
        if total <= 0:
            raise ValueError(f"{path}: the video stream holds no frames")
        indices = sample(total, fps)
        wanted, last = set(indices), max(indices)
        frames, kept = [], []
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    kept.append(i)
                    if progress is not None:
                        progress(len(kept))
                if i >= last:
                    break
        except av.error.FFmpegError as err:
            raise ValueError(f"{path}: decoding failed at frame {len(kept)}: {err}") from None
    if not frames:
        raise ValueError(f"{path}: no frame could be decoded")
    # A header may announce a few frames more than the stream holds; the frames decoded are kept.
    return np.stack(frames), kept, fps
