"""`fused-moonvit`: the command line.

`fused-moonvit encode IMAGE... [--video PATH]... [--model DIR] [--out FILE]` encodes images, and with a
Kimi-K2.5 / K2.6 / K3 model videos, to embeddings: one tensor per image and per video chunk in a
safetensors file. Without `--model` Kimi-VL's architecture is built with seeded random weights, or
Kimi-K2.5's for `--demo --video`, which adds a built-in generated clip to the demo image.

A mistake in the arguments (a missing file, a model directory that does not fit, an output path that
cannot be written) is reported before any model is built: one line on stderr, exit status 2. Set
FUSED_MOONVIT_DEBUG=1, or pass --debug, to see the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

from .arguments import (DEBUG_ENV, DTYPES, OneLineParser, UsageError, cannot_write_into, debug_requested,
                        positive_int)
from fused_moonvit.kernels.items import Items
from fused_moonvit.kernels.limits import MERGE_SIDE

from .families import KIMI_K25, KIMI_VL, family_of, titles, video_families
from .preprocess import IN_TOKEN_LIMIT_INSTRUCT, IN_TOKEN_LIMIT_THINKING

# The model kinds messages name, from the family declarations, so that they stay in step with them.
MODELS = f"{titles()} (or a standalone MoonViT tower)"
VIDEO_MODELS = titles(video_families())
KEYS_PER_KIND = 3  # checkpoint keys named per kind of mismatch in the one-line error
MODEL_DIR_LAYOUT = "config.json plus model.safetensors, or model.safetensors.index.json and its shards"
# Larger images are refused up front (--max-image-pixels raises it): 250 MP covers the largest camera
# sensors (200 MP), and one such RGB image decodes to 750 MB.
MAX_IMAGE_PIXELS = 250_000_000
# An image's smallest patch grid is one 2x2 merge: a patch limit below it can never be met.
MIN_IN_TOKEN_LIMIT = MERGE_SIDE * MERGE_SIDE
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (128 + 2)
# The demo clip: few and small frames, since the real-size tower runs eagerly on a CPU (two chunks of
# 4 x 6 x 8 patches, a few seconds each on two cores).
DEMO_CLIP_FRAMES, DEMO_CLIP_SIZE = 8, (84, 112)


def in_token_limit(text: str) -> int:
    """argparse type: a patch limit an image can meet."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {MIN_IN_TOKEN_LIMIT}, got {text!r}") from None
    if value < MIN_IN_TOKEN_LIMIT:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_IN_TOKEN_LIMIT}, got {value}: the smallest grid an image "
                                         f"can have is {MERGE_SIDE}x{MERGE_SIDE} patches, so a lower limit can never be met")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the encoder runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here (torch {torch.__version__}, "
                                             f"{build}); use --device cpu, or leave --device out")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    return device


@contextlib.contextmanager
def _pillow_size_check_off():
    """Pillow's own decompression-bomb check warns above 89 megapixels and raises above 179, as a raw
    warning or a traceback mid-run; the command checks every image's size against --max-image-pixels
    before any work instead (`_check_pixels`)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(path: str, what: str, limit: int) -> None:
    """Refuses an image above `limit` pixels, from its header alone (nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            w, h = image.size
    except OSError:
        return  # an unreadable file is reported where it is read, with the reader's own message
    if w * h > limit:
        raise UsageError(f"{what} is {w}x{h} px ({w * h / 1e6:.0f} megapixels), above the limit of "
                         f"{limit / 1e6:g} megapixels that guards against decompression bombs; give "
                         f"--max-image-pixels {w * h} (or more) to encode it")


def _check_images(paths: list[str], max_pixels: int) -> None:
    for path in paths:
        if os.path.isdir(path):
            raise UsageError(f"{path} is a directory, not an image file; give the image files in it instead "
                             f"(or --video {path} for a folder of a video's frames)")
        if not os.path.exists(path):
            raise UsageError(f"no such image file: {path}")
        _check_pixels(path, path, max_pixels)


def _check_videos(paths: list[str], max_pixels: int) -> None:
    from .preprocess import PYAV_MISSING, frame_files, pyav_available

    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"--video {path}: no such video file or frame folder")
        if os.path.isdir(path):
            try:
                frames = frame_files(path)
            except ValueError:
                frames = []  # a folder that is not a frame folder is reported, with its reason, where it is read
            for frame in frames:
                _check_pixels(frame, f"--video {path}: frame {frame}", max_pixels)
        elif not pyav_available():
            raise UsageError(f"--video {path}: {PYAV_MISSING}")


def _check_out(path: str) -> None:
    """The output file must be writable before any work is done, since the model and the images come first."""
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a directory; give a file path, e.g. "
                         f"{os.path.join(path, 'embeddings.safetensors')}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise UsageError(f"--out {path}: {parent} {what}; create the directory first or choose another path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"--out {path}: not writable here (permission denied)")
    why = cannot_write_into(parent)
    if why:
        raise UsageError(f"--out {path}: cannot create a file in {parent} ({why})")


def _check_model(model_dir: str, cls, video: bool):
    """Reads config.json and the checkpoint's headers, and compares them, without building anything;
    returns the config. `video`: the command has videos to encode, which only some models take."""
    from .checkpoint import CheckpointError
    from .loading import check_model_dir

    if not os.path.isdir(model_dir):
        what = "is not a directory" if os.path.exists(model_dir) else "does not exist"
        raise UsageError(f"--model {model_dir} {what}; give a local model directory of "
                         f"{VIDEO_MODELS if video else MODELS}: {MODEL_DIR_LAYOUT}")
    try:
        return check_model_dir(model_dir, cls=cls)
    except CheckpointError as err:
        listed_in_full = all(len(keys) <= KEYS_PER_KIND for keys in err.problems.values())
        raise UsageError(err.one_line(KEYS_PER_KIND) + ("" if listed_in_full else "; --debug lists them all")) from err
    except (OSError, ValueError) as err:
        raise UsageError(" ".join(str(err).split())) from err


def _write_safetensors(tensors: dict, metadata: dict, path: str) -> None:
    """Writes the file beside its final name, then renames it: a failure leaves no partial output, and the
    file's mode follows the umask (safetensors' own writer creates it readable by its owner only)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    partial = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def _demo_image():
    """A 336x224 synthetic image (gradients and a disc), so the command runs with no file at hand."""
    import numpy as np
    from PIL import Image

    h, w = 224, 336
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    disc = ((yy - 100) ** 2 + (xx - 200) ** 2 < 60 ** 2).astype(np.float32)
    rgb = np.stack([xx / w, yy / h, disc], axis=-1) * 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _demo_clip():
    """(frames (8, 84, 112, 3) uint8, their names): a disc crossing a gradient, generated here."""
    import numpy as np

    h, w = DEMO_CLIP_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(DEMO_CLIP_FRAMES):
        cx = w * (0.2 + 0.6 * t / (DEMO_CLIP_FRAMES - 1))
        disc = ((yy - h / 2) ** 2 + (xx - cx) ** 2 < (h / 4) ** 2).astype(np.float32)
        frames.append(np.stack([xx / w, yy / h, disc], axis=-1) * 255)
    return np.stack(frames).astype(np.uint8), [f"frame {t}" for t in range(DEMO_CLIP_FRAMES)]


def _model_class(device: torch.device):
    if device.type == "cuda":
        from .fused import FusedMoonVit

        return FusedMoonVit
    from .reference import MoonVitReference

    return MoonVitReference


def _load_encoder(args: argparse.Namespace, cls, config, device: torch.device, dtype: torch.dtype):
    """(encode, name): the CUDA-graph runner on a GPU, else the eager reference, one image at a time."""
    from .loading import build_model

    model = build_model(cls, args.model, config=config, dtype=dtype, device=device, seed=args.seed)
    if device.type == "cuda":
        from .runner import MoonVitGraphRunner

        # One command, then exit: each budget is captured when an image first needs it, on purpose.
        return MoonVitGraphRunner(model, warn_on_lazy_capture=False).encode, "fused CUDA-graph encoder"
    return (lambda pixels, items: [model(pixels, items)]), "eager reference"


class _Item:
    """One encoder input: an image, or one chunk of a video; `items` is its validated `Items` (one row),
    checked where it was read so that a bad grid names its file, and passed to the encoder as it is."""

    def __init__(self, key: str, label: str, pixels: torch.Tensor, items: Items, what: str = ""):
        self.key, self.label, self.pixels, self.items, self.what = key, label, pixels, items, what


def _image_items(sources: list, config, inputs, in_token_limit: int | None, notes: list[str]) -> list[_Item]:
    """Every image, read as vLLM reads it (what that changes unseen is noted) and cut into patches: by hand
    for Kimi-VL, by transformers' processor for MoonViT3d."""
    from .preprocess import load_image, preprocess_image

    items = []
    for i, (label, image) in enumerate(sources):
        try:
            said = []
            image = load_image(image, notes=said)
            notes.extend(f"note: {label}: {text}" for text in said)
            if inputs is None:
                pixels, grid = preprocess_image(image, in_token_limit=in_token_limit or IN_TOKEN_LIMIT_INSTRUCT)
            else:
                pixels, grid = inputs.image_inputs(image, max_patches=in_token_limit)
            one = Items.of([grid], max_frames=config.max_frames)
        except (OSError, ValueError) as err:
            raise UsageError(f"{label}: {' '.join(str(err).split())}") from err
        items.append(_Item(f"image_{i}", label, pixels, one))
    return items


def _video_items(paths: list[str | None], config, inputs, notes: list[str]) -> list[_Item]:
    """Every video's frames (a folder's, all of them; a file's, sampled as the video processor samples;
    None: the demo clip's), cut into chunks and patches by transformers' video processor."""
    from tqdm import tqdm

    from .preprocess import read_frame_folder, read_video_file

    items = []
    for v, path in enumerate(paths):
        try:
            if path is None:
                frames, origin = _demo_clip()
                path = "demo clip"
                summary = f"{len(frames)} frames of {frames.shape[2]}x{frames.shape[1]} px, generated"
            elif os.path.isdir(path):
                said = []
                frames, names = read_frame_folder(path, notes=said)
                notes.extend(f"note: {path}: {text}" for text in said)
                origin = names
                summary = f"{len(names)} frames from the folder"
            else:
                with tqdm(desc=f"decoding {os.path.basename(path)}", unit="frame", file=sys.stderr,
                          leave=False, disable=None) as bar:
                    frames, indices, fps = read_video_file(path, inputs.sample_indices,
                                                           progress=lambda n: bar.update(n - bar.n))
                origin = [f"frame {i} ({i / fps:.2f} s)" for i in indices]
                summary = (f"{len(indices)} frames sampled from a {fps:g} fps video (the processor samples "
                           f"{inputs.video.fps:g} fps)")
            pixels, grids = inputs.video_inputs(frames)
            chunks = Items.of(grids, max_frames=config.max_frames)
        except (OSError, ValueError) as err:
            raise UsageError(f"--video {path}: {' '.join(str(err).split())}") from err
        offsets = chunks.offsets
        first = 0
        notes.append(f"{path}: {summary}, {len(chunks)} chunk(s) of up to {inputs.frames_per_chunk} frames")
        for c, (t, h, w) in enumerate(chunks):
            what = origin[first] if t == 1 else f"{origin[first]} to {origin[first + t - 1]}"
            items.append(_Item(f"video_{v}_chunk_{c}", path, pixels[offsets[c]:offsets[c + 1]], chunks[c:c + 1],
                               f"chunk {c}, {what}"))
            first += t
    return items


def _encode(args: argparse.Namespace) -> int:
    with _pillow_size_check_off():
        return _encode_checked(args)


def _encode_checked(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not args.images and not args.demo and not args.videos:
        raise UsageError(f"give at least one IMAGE, or --demo for a built-in synthetic image, or --video PATH "
                         f"with a {VIDEO_MODELS} --model, or --demo --video for a built-in clip")
    # A bare --video stands for the demo clip, which runs first, as the demo image does.
    demo_clip = None in args.videos
    args.videos = [v for v in args.videos if v is not None]
    if demo_clip and not args.demo:
        raise UsageError("--video needs a PATH (a video file or a folder of its frames); --demo --video, with no "
                         "PATH, encodes a built-in generated clip")
    _check_images(args.images, args.max_image_pixels)
    _check_videos(args.videos, args.max_image_pixels)
    _check_out(args.out)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda" and dtype == torch.float32:
        raise UsageError("--dtype float32: the fused encoder runs in bfloat16 or float16 on CUDA (FlashAttention); "
                         "use --dtype bfloat16, or --device cpu for float32")

    cls = _model_class(device)
    if args.model is None:
        # Random weights of the real architecture: Kimi-K2.5's for the demo clip, else Kimi-VL's.
        config = (KIMI_K25 if demo_clip else KIMI_VL).real_size_config()
    else:
        config = _check_model(args.model, cls, video=bool(args.videos))
    family = family_of(config)
    moonvit3d = family in video_families()  # transformers' Kimi-K2.5 processors: images and videos
    if (args.videos or demo_clip) and not moonvit3d:
        raise UsageError(
            f"--video needs a {VIDEO_MODELS} model (MoonViT3d): "
            + (f"without --model the random-weight model is {family.title}'s, whose encoder takes images only; "
               "give --model DIR of such a checkpoint (or try --demo --video, a built-in clip through random "
               "Kimi-K2.5 weights)" if args.model is None else
               f"--model {args.model} holds {family.title}'s encoder, which takes images only"))
    elif args.videos and args.model is None:
        raise UsageError(f"--video PATH needs a {VIDEO_MODELS} --model DIR: the random weights of the demo take "
                         f"the built-in clip only (--demo --video)")

    # Every input is read and checked before the model is built, so a bad one costs nothing.
    inputs = None
    if moonvit3d:
        from .preprocess import KimiK25Inputs, ProcessorUnavailable

        try:
            inputs = KimiK25Inputs(args.model)
            inputs.check_model(config.patch_size, config.max_frames)
        except ProcessorUnavailable as err:
            raise UsageError(str(err)) from err
        except (OSError, ValueError) as err:
            raise UsageError(f"--model {args.model}: {' '.join(str(err).split())}") from err
    sources = [("demo", _demo_image())] if args.demo else []
    sources += [(p, p) for p in args.images]
    notes = []
    items = _image_items(sources, config, inputs, args.in_token_limit, notes)
    items += _video_items([None] * demo_clip + args.videos, config, inputs, notes)
    # Said once every input has passed, so that a mistake is the command's only line.
    if inputs is not None:
        print(f"note: inputs prepared by transformers' Kimi_K25ImageProcessor and Kimi_K25VideoProcessor, "
              f"settings from {inputs.source}", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)

    if args.model is None:
        architecture = f"{family.title} architecture ({family.tower}, real size)"
        print(f"note: no --model given: using the {architecture} with seeded random weights "
              f"(seed {args.seed}); the embeddings are not meaningful", file=sys.stderr)
    if device.type != "cuda":
        print(f"note: no CUDA device ({device}): the fused CUDA-graph encoder needs one, so the eager "
              f"reference model runs instead", file=sys.stderr)
    t0 = time.perf_counter()
    encode, name = _load_encoder(args, cls, config, device, dtype)
    print(f"{name} ready on {device} in {str(dtype).removeprefix('torch.')} ({time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)

    tensors, metadata = {}, {}
    # One item per call keeps the progress bar honest; the graph runner packs larger calls itself.
    unit = "item" if args.videos or demo_clip else "image"
    for item in tqdm(items, desc="encoding", unit=unit, file=sys.stderr):
        (out,) = encode(item.pixels.to(device), item.items)
        tensors[item.key] = out.float().cpu().contiguous()
        metadata[item.key] = f"{item.label}: {item.what}" if item.what else item.label
        ((t, h, w),) = item.items.rows
        shape = f"{h}x{w}" if not item.what else f"{t}x{h}x{w}"
        tokens = item.items.outputs
        where = f"{item.label} {item.what}" if item.what else item.label
        tqdm.write(f"{where}: grid {shape} patches -> {tokens} tokens x {out.shape[1]}", file=sys.stdout)
    random_weights = f"seeded random weights (seed {args.seed}), a demo: not meaningful"
    metadata["weights"] = random_weights if args.model is None else os.path.abspath(args.model)
    _write_safetensors(tensors, metadata, args.out)
    print(f"wrote {len(tensors)} float32 embeddings to {args.out}" + (f" ({random_weights})" if args.model is None
                                                                       else ""))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"fused_moonvit.benchmarks.bench_{args.which}")
    return module.main(args.rest) or 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fused-moonvit")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fused-moonvit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{encode,bench}")
    enc = sub.add_parser("encode", help="encode images and videos to MoonVit embeddings (one tensor per image "
                                        "or video chunk)")
    enc.add_argument("images", nargs="*", metavar="IMAGE", help="image files (anything Pillow opens)")
    enc.add_argument("--video", dest="videos", action="append", default=[], nargs="?", const=None, metavar="PATH",
                     help="a video file (decoded with PyAV) or a folder of its frames (image files, sorted by "
                          f"name); needs a {VIDEO_MODELS} --model; may be repeated. With --demo and no PATH: "
                          "a built-in generated clip (8 frames of 112x84 px), through random Kimi-K2.5 weights "
                          "without --model")
    enc.add_argument("--demo", action="store_true", help="also encode a built-in synthetic 336x224 image (and a "
                                                         "built-in clip with --video)")
    enc.add_argument("--model", metavar="DIR",
                     help=f"local model directory of {MODELS}: {MODEL_DIR_LAYOUT}; without it, Kimi-VL's "
                          "architecture with seeded random weights")
    enc.add_argument("--out", default="embeddings.safetensors", metavar="FILE",
                     help="output safetensors file, float32 whatever --dtype is (default: %(default)s)")
    enc.add_argument("--in-token-limit", type=in_token_limit, metavar="N",
                     help=f"patch limit per image, as the model's processor applies it: an image whose whole "
                          f"14-px patches exceed N is scaled down until they fit, then padded to even sides for "
                          f"the 2x2 merge; at least {MIN_IN_TOKEN_LIMIT}. For Kimi-VL {IN_TOKEN_LIMIT_INSTRUCT} "
                          f"(Kimi-VL-A3B-Instruct, the default) or {IN_TOKEN_LIMIT_THINKING} (-Thinking-2506); for "
                          f"Kimi-K2.5 the image processor's max_patches (default: its setting, 16384)")
    enc.add_argument("--max-image-pixels", type=positive_int, default=MAX_IMAGE_PIXELS, metavar="N",
                     help="refuse larger images, as possible decompression bombs (default: %(default)s)")
    enc.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    enc.add_argument("--dtype", choices=sorted(DTYPES),
                     help="the model's dtype (default: bfloat16 on cuda, float32 on cpu); the output is float32")
    enc.add_argument("--seed", type=int, default=0, help="seed of the random weights without --model")
    enc.set_defaults(func=_encode)
    bench = sub.add_parser("bench", help="run a benchmark (arguments after the name go to it; try --help)")
    bench.add_argument("which", choices=["encoder", "kernels", "profile", "fallback"], help="what to benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = os.environ.get(DEBUG_ENV)
    if "--debug" in argv:
        # Through the environment, so that the benchmarks' own parsers see it too.
        os.environ[DEBUG_ENV] = "1"
    try:
        args = build_parser().parse_args(argv)
        try:
            return args.func(args)
        except UsageError as err:
            if debug_requested():
                raise
            print(f"fused-moonvit {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if debug_requested():
                raise
            # The output is written under a temporary name and renamed when complete, so nothing is left.
            print(f"fused-moonvit {args.command}: interrupted" + ("; nothing was written" if args.command == "encode"
                                                                   else ""), file=sys.stderr)
            return INTERRUPTED
    finally:
        if previous is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = previous

if __name__ == "__main__":
    raise SystemExit(main())
