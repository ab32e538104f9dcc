"""Offline Kimi-VL inference with vLLM, through the fused MoonVit encoder.

    pip install -e ".[vllm]"        # in the fused-moonvit checkout
    python -m fused_moonvit.integration.example_offline --image photo.jpg

Nothing here names the plugin: installing fused-moonvit next to vLLM is what swaps the encoder in, and
`FUSED_MOONVIT_DISABLE=1` swaps vLLM's own back. vLLM's log says which one is in use (a line starting
`fused-moonvit:` from the engine process). Encoder CUDA graphs are on unless `--no-encoder-graphs`.

Without vLLM, or with an image that cannot be read, it says so in one line (exit status 2) before any
model is loaded.
"""

from __future__ import annotations

import os

from fused_moonvit.moonvit.cli import OneLineParser

VLLM_MISSING = ('vLLM is not installed in this environment; install it with: pip install -e ".[vllm]" in the '
                'fused-moonvit checkout')


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m fused_moonvit.integration.example_offline",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moonshotai/Kimi-VL-A3B-Instruct",
                        help="hub name or local directory of a Kimi-VL checkpoint")
    parser.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--no-encoder-graphs", action="store_true",
                        help="run the encoder eagerly instead of through vLLM's encoder CUDA graphs")
    args = parser.parse_args(argv)

    from PIL import Image

    images = []
    for path in args.image:
        if not os.path.isfile(path):
            parser.error(f"--image {path}: no such image file")
        try:
            image = Image.open(path)
            image.load()  # decoded here, so that a bad file is reported here
        except OSError as err:
            parser.error(f"--image {path}: {' '.join(str(err).split())}")
        # Passed as read: vLLM applies its EXIF orientation and makes it RGB (transparency onto white) itself.
        images.append(image)
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        if (err.name or "").split(".")[0] != "vllm":
            raise  # vLLM is there but broken: its own traceback says how
        parser.error(VLLM_MISSING)

    # Budgets count output tokens (a 448x448 image is 256); vLLM packs each step's images into the
    # smallest that fits and runs larger batches eagerly. Dense, as vLLM 0.34's own grid is: a step pays
    # the layers' GEMMs for its whole budget (0.33's default grid doubles).
    encoder_graphs = {"cudagraph_mm_encoder": True,
                      "encoder_cudagraph_token_budgets": [64, 128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048,
                                                          2560, 3072, 4096],
                      "encoder_cudagraph_max_vision_items_per_batch": 32}
    llm = LLM(
        model=args.model,
        trust_remote_code=True,
        max_model_len=16384,
        max_num_batched_tokens=8192,
        limit_mm_per_prompt={"image": len(args.image)},
        tensor_parallel_size=args.tensor_parallel_size,
        # The fused encoder is not sharded: with several GPUs, each runs it on its share of the images.
        mm_encoder_tp_mode="data",
        compilation_config={} if args.no_encoder_graphs else encoder_graphs,
    )
    content = [{"type": "image_pil", "image_pil": image} for image in images]
    content.append({"type": "text", "text": args.prompt})
    outputs = llm.chat([{"role": "user", "content": content}],
                       SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    print(outputs[0].outputs[0].text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
