"""`fused-moonvit`: the command line.

`fused-moonvit encode IMAGE... [--model DIR] [--out FILE]` encodes images to embeddings, one tensor per
image in a safetensors file. Without `--model` the real architecture is built with seeded random weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .preprocess import IN_TOKEN_LIMIT_INSTRUCT, IN_TOKEN_LIMIT_THINKING

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _demo_image():
    """A 336x224 synthetic image (gradients and a disc), so the command runs with no file at hand."""
    import numpy as np
    from PIL import Image

    h, w = 224, 336
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    disc = ((yy - 100) ** 2 + (xx - 200) ** 2 < 60 ** 2).astype(np.float32)
    rgb = np.stack([xx / w, yy / h, disc], axis=-1) * 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _load_encoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(encode, name): the CUDA-graph runner on a GPU, else the eager reference, one image at a time."""
    from .loading import build_model

    if device.type == "cuda":
        from .fused import FusedMoonVit, MoonVitGraphRunner

        model = build_model(FusedMoonVit, args.model, dtype=dtype, device=device, seed=args.seed)
        return MoonVitGraphRunner(model).encode, "fused CUDA-graph encoder"
    from .reference import MoonVitReference

    print(f"note: no CUDA device ({device}): the fused CUDA-graph encoder needs one, so the eager "
          f"reference model runs instead", file=sys.stderr)
    model = build_model(MoonVitReference, args.model, dtype=dtype, device=device, seed=args.seed)
    return (lambda pixels, grids: [model(pixels, grids)]), "eager reference"


def _encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .preprocess import preprocess_image, tokens_per_image

    if not args.images and not args.demo:
        print("error: give at least one IMAGE, or --demo for a built-in synthetic image", file=sys.stderr)
        return 2
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        print(f"error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda" and dtype == torch.float32:
        print("error: the fused encoder runs in bfloat16 or float16 on CUDA (FlashAttention); "
              "use --dtype bfloat16, or --device cpu for float32", file=sys.stderr)
        return 2

    # Every image is read and checked before the model is built, so a bad one costs nothing.
    inputs = [("demo", _demo_image())] if args.demo else []
    inputs += [(p, p) for p in args.images]
    prepared = []
    for label, image in inputs:
        try:
            prepared.append((label, *preprocess_image(image, in_token_limit=args.in_token_limit)))
        except (OSError, ValueError) as err:
            print(f"error: {label}: {err}", file=sys.stderr)
            return 2

    if args.model is None:
        print(f"note: no --model given: using the Kimi-VL MoonVit architecture with seeded random weights "
              f"(seed {args.seed}); the embeddings are not meaningful", file=sys.stderr)
    t0 = time.perf_counter()
    encode, name = _load_encoder(args, device, dtype)
    print(f"{name} ready on {device} in {str(dtype).removeprefix('torch.')} ({time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)

    tensors, metadata = {}, {}
    # One image per call keeps the progress bar honest; the graph runner packs larger calls itself.
    for i, (label, pixels, grid) in enumerate(tqdm(prepared, desc="encoding", unit="image", file=sys.stderr)):
        (out,) = encode(pixels.to(device), torch.tensor([grid]))
        key = f"image_{i}"
        tensors[key] = out.float().cpu().contiguous()
        metadata[key] = label
        tqdm.write(f"{label}: grid {grid[0]}x{grid[1]} patches -> {tokens_per_image([grid])[0]} tokens "
                   f"x {out.shape[1]}", file=sys.stdout)
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {len(tensors)} embeddings to {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"fused_moonvit.benchmarks.bench_{args.which}")
    return module.main(args.rest) or 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-moonvit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode images to MoonVit embeddings (one tensor per image)")
    enc.add_argument("images", nargs="*", metavar="IMAGE", help="image files (anything Pillow opens)")
    enc.add_argument("--demo", action="store_true", help="also encode a built-in synthetic 336x224 image")
    enc.add_argument("--model", metavar="DIR",
                     help="local Kimi-VL or MoonViT model directory (config.json + safetensors); "
                          "without it, seeded random weights")
    enc.add_argument("--out", default="embeddings.safetensors", metavar="FILE",
                     help="output safetensors file (default: %(default)s)")
    enc.add_argument("--in-token-limit", type=_positive_int, default=IN_TOKEN_LIMIT_INSTRUCT,
                     help=f"patch limit per image before downscaling: {IN_TOKEN_LIMIT_INSTRUCT} for Kimi-VL-A3B-Instruct, "
                          f"{IN_TOKEN_LIMIT_THINKING} for -Thinking-2506 (default %(default)s)")
    enc.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    enc.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    enc.add_argument("--seed", type=int, default=0, help="seed of the random weights without --model")
    enc.set_defaults(func=_encode)
    bench = sub.add_parser("bench", help="run a benchmark (arguments after the name go to it; try --help)")
    bench.add_argument("which", choices=["encoder", "kernels", "profile"], help="what to benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
