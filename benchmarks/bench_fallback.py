"""What vLLM 0.34's eager fallback costs with the fused encoder, and what the pixel buffer's clear costs.

`fused-moonvit bench fallback --out DIR` (CUDA; real MoonVit size, random bf16
weights) writes DIR/fallback.json with two parts, each timed as whole calls (host work included: CUDA
events around the call on an idle GPU, median of `--iters` after `--warmup`):

1. **Beyond the largest budget.** vLLM 0.34 replays each batch once, into the smallest captured budget
   that holds it, and runs a batch above its largest budget (`--largest`, default 5120 output tokens,
   0.34's `encoder_cudagraph_max_token_budget`) eagerly in one forward. For a batch `--over` tokens above
   it, rows: the eager forward the plugin's `encoder_eager_forward` runs; one replay at the budget a larger
   cap would add next (`--next-budget`, 5632 on 0.34's default grid) and at the batch's exact size; two
   replays of captured budgets (the largest, then the smallest that holds the rest), which is what
   serving it through the existing graphs would take; and one replay of a batch that fills the largest
   budget exactly, for the cost per token. Graph rows run `integration/encoder_graph.py`'s buffers, padding
   logics and graph body, as the plugin does. The pool growth of each capture (largest first, one pool)
   says what the larger budgets cost in memory.
2. **Pixel copies.** Per replay, vLLM's default copy clears the whole captured pixel buffer and copies
   the batch's rows; the plugin's padding logic copies the rows only. Device time of each, per budget
   and fill.

`--smoke` runs both parts on the CPU with a tiny config, without graphs (the body runs directly) and
one call per row, so that CI can run the script end to end; its figures mean nothing, and it writes
into a new temporary directory unless `--out` names another (never benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch

from fused_moonvit.benchmarks.common import SMOKE_CONFIG, add_run_arguments, measure
from fused_moonvit.benchmarks.outdir import add_out_argument, check_out, out_dir
from fused_moonvit.moonvit.arguments import OneLineParser
from fused_moonvit.moonvit.config import MoonVitConfig

IMAGE_SIDE = 64  # patches: 1024-token images (896x896 pixels) fill the batch, a smaller one tops it up
SMOKE_IMAGE_SIDE = 8


def batch_grid(tokens: int, side: int) -> list[list[int]]:
    """Images of exactly `tokens` output tokens: side x side-patch images, then the rest as one
    2-patch-high strip."""
    full, rest = divmod(tokens, side * side // 4)
    grid = [[side, side]] * full
    if rest:
        grid.append([2, 2 * rest])
    return grid


class Graphs:
    """The plugin's graphs for some token budgets, captured largest first into one pool, as vLLM 0.34
    does (its buffer sharing saves no pool memory, so each budget has its own buffers here). On the CPU
    the body runs directly at each "replay"."""

    def __init__(self, encoder, token_budgets: list[int], slots: int):
        from fused_moonvit.integration import encoder_graph as eg

        self.eg, self.encoder, self.slots = eg, encoder, slots
        self.buffers, self.graphs, self.outputs, self.pool_growth = {}, {}, {}, {}
        cuda = encoder.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if cuda else None
        for budget in sorted(token_budgets, reverse=True):
            buffers = eg.capture_buffers(encoder, budget, slots, encoder.device, encoder.dtype)
            self.buffers[budget] = buffers
            if cuda:
                self._capture(budget, pool)

    def _capture(self, budget: int, pool) -> None:
        from fused_moonvit.moonvit.runner import capture_graph

        # As vLLM's manager does: one eager run (Triton compiles, cuBLAS settles), then the capture.
        buffers = self.buffers[budget]
        self.graphs[budget], self.outputs[budget], self.pool_growth[budget] = capture_graph(
            lambda: self.eg.graph_forward(self.encoder, dict(buffers)), device=self.encoder.device, pool=pool)

    def run(self, budget: int, pixel_values: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
        """One replay's whole call: replay values, the padding logics' copies, the replay, the valid rows
        copied out (the manager's clone)."""
        eg = self.eg
        values = eg.replay_values(self.encoder, pixel_values, grid, self.slots)
        buffers = self.buffers[budget]
        for key, buffer in buffers.items():
            eg.PADDING_LOGICS[key](buffer, values[key])
        if budget in self.graphs:
            self.graphs[budget].replay()
            out = self.outputs[budget]
        else:
            out = eg.graph_forward(self.encoder, dict(buffers))
        return out[: pixel_values.shape[0] // 4].clone()


def clear_and_copy(buffer: torch.Tensor, rows: torch.Tensor) -> None:
    """vLLM's default replay copy for a buffer without a padding logic."""
    buffer.zero_()
    buffer[: rows.shape[0]].copy_(rows)


def fallback_rows(encoder, args, timing: dict) -> dict:
    from fused_moonvit.integration.encoder_graph import select_items

    largest, over = args.largest, args.over
    tokens = largest + over
    side = SMOKE_IMAGE_SIDE if args.smoke else IMAGE_SIDE
    grid = batch_grid(tokens, side)
    split = next(i for i in range(len(grid), 0, -1) if sum(h * w for h, w in grid[:i]) // 4 <= largest)
    rest_tokens = sum(h * w for h, w in grid[split:]) // 4
    rest_budget = next(b for b in args.small_budgets if b >= rest_tokens)
    budgets = sorted({largest, args.next_budget, tokens, rest_budget})
    graphs = Graphs(encoder, budgets, args.slots)
    gen = torch.Generator().manual_seed(args.seed)
    p = encoder.config.patch_size

    def pixels(g):
        n = sum(h * w for h, w in g)
        return (torch.rand(n, 3, p, p, generator=gen) * 2 - 1).to(encoder.device, encoder.dtype)

    pixel_values = pixels(grid)
    head, head_grid = select_items(pixel_values, grid, range(split))
    tail, tail_grid = select_items(pixel_values, grid, range(split, len(grid)))
    full_grid = batch_grid(largest, side)
    full_pixels = pixels(full_grid)

    def two_replays():
        return torch.cat([graphs.run(largest, head, head_grid), graphs.run(rest_budget, tail, tail_grid)])

    calls = {
        "eager_forward": (lambda: encoder(pixel_values, grid), tokens),
        f"one_replay_at_{args.next_budget}": (lambda: graphs.run(args.next_budget, pixel_values, grid), tokens),
        f"one_replay_at_{tokens}": (lambda: graphs.run(tokens, pixel_values, grid), tokens),
        f"two_replays_{largest}_and_{rest_budget}": (two_replays, tokens),
        f"full_batch_one_replay_at_{largest}": (lambda: graphs.run(largest, full_pixels, full_grid), largest),
    }
    eager = calls["eager_forward"][0]()
    rows = {}
    for name, (fn, batch_tokens) in calls.items():
        out = fn()
        row = measure(fn, **timing)
        row["tokens"] = batch_tokens
        row["ms_per_1k_tokens"] = row["ms"] / batch_tokens * 1e3
        if batch_tokens == tokens:
            row["max_abs_diff_vs_eager"] = (out.float() - eager.float()).abs().max().item()
        rows[name] = row
    eager_ms = rows["eager_forward"]["ms"]
    for row in rows.values():
        row["eager_over_this"] = eager_ms / row["ms"]
    return {"batch_tokens": tokens, "grid": grid, "largest_budget": largest, "split_at_image": split,
            "rest_budget": rest_budget, "slots": args.slots, "rows": rows,
            "graph_pool_growth_bytes_largest_first": {str(b): v for b, v in sorted(graphs.pool_growth.items())}}


def pixel_copy_rows(encoder, args, timing: dict) -> list[dict]:
    from fused_moonvit.integration.encoder_graph import copy_pixel_rows, patch_budget

    p = encoder.config.patch_size
    results = []
    for budget in args.copy_budgets:
        buffer = torch.zeros(patch_budget(budget), 3, p, p, device=encoder.device, dtype=encoder.dtype)
        for fill in args.fills:
            rows = torch.randn(patch_budget(budget) * fill // 100 // 4 * 4, 3, p, p, device=encoder.device,
                               dtype=encoder.dtype)
            entry = {"token_budget": budget, "fill_percent": fill, "buffer_bytes": buffer.numel() * buffer.element_size(),
                     "rows_bytes": rows.numel() * rows.element_size()}
            for name, logic in (("clear_and_copy", clear_and_copy), ("copy_valid_rows", copy_pixel_rows)):
                def repeated(logic=logic):
                    for _ in range(args.copy_reps):
                        logic(buffer, rows)

                row = measure(repeated, **timing)
                entry[f"{name}_us"] = row["ms"] * 1e3 / args.copy_reps
            entry["saved_us"] = entry["clear_and_copy_us"] - entry["copy_valid_rows_us"]
            results.append(entry)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fused-moonvit bench fallback", description=__doc__.split("\n\n")[0])
    add_out_argument(parser, "fallback.json")
    parser.add_argument("--largest", type=int, default=5120, metavar="TOKENS",
                        help="largest captured budget in output tokens (default: vLLM 0.34's cap, %(default)s)")
    parser.add_argument("--over", type=int, default=64, metavar="TOKENS",
                        help="how far above it the batch is, a multiple of 4 (default %(default)s)")
    parser.add_argument("--next-budget", type=int, default=5632, metavar="TOKENS",
                        help="the budget a larger cap adds next (default: 0.34's grid point after 5120)")
    parser.add_argument("--small-budgets", type=int, nargs="+", default=[64, 80, 96, 112, 128, 160, 192, 224, 256],
                        metavar="TOKENS", help="captured budgets the rest of a split batch may use (0.34's grid)")
    parser.add_argument("--slots", type=int, default=16, help="image slots per graph (default %(default)s)")
    parser.add_argument("--copy-budgets", type=int, nargs="+", default=[1024, 5120], metavar="TOKENS")
    parser.add_argument("--fills", type=int, nargs="+", default=[10, 50, 90], metavar="PERCENT",
                        help="share of the pixel buffer a batch fills (default: %(default)s)")
    parser.add_argument("--copy-reps", type=int, default=50, help="copies per timed call (default %(default)s)")
    add_run_arguments(parser, smoke="CPU, tiny config and budgets, one call per row: checks the script, "
                                    "measures nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_out(args, parser)
    if args.smoke:
        args.largest, args.over, args.next_budget, args.small_budgets = 64, 16, 96, [16, 32]
        args.copy_budgets, args.copy_reps = [64], 1
    for name in ("largest", "over", "next_budget", "slots", "copy_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.over % 4:
        parser.error(f"--over must be a multiple of 4 tokens, got {args.over}")
    if args.next_budget < args.largest + args.over:
        parser.error(f"--next-budget {args.next_budget} does not hold the batch of {args.largest + args.over} tokens")
    if not all(0 < f <= 100 for f in args.fills):
        parser.error(f"--fills must be percentages in 1..100, got {args.fills}")
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        parser.error("needs a CUDA device (--smoke runs on the CPU)")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported, below

    from fused_moonvit.moonvit import FusedMoonVit, build_model

    fields = dict(SMOKE_CONFIG) if args.smoke else {}
    if args.layers is not None:
        fields["num_hidden_layers"] = args.layers
    config = MoonVitConfig(**fields)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    encoder = build_model(FusedMoonVit, config=config, dtype=dtype, device=device, seed=args.seed)
    timing = dict(cuda=cuda, iters=args.iters, warmup=args.warmup)
    with torch.no_grad():
        fallback = fallback_rows(encoder, args, timing)
        copies = pixel_copy_rows(encoder, args, timing)
    report = {
        "benchmark": "fallback",
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["fused-moonvit", "bench", "fallback", *(sys.argv[1:] if argv is None else argv)]),
        "smoke": args.smoke,
        "dtype": str(dtype).removeprefix("torch."),
        "config": {k: getattr(config, k) for k in MoonVitConfig._FIELDS},
        "weights": f"random (build_model seed {args.seed})",
        "timing": "whole calls, host work included: CUDA events around the call, median of iters"
                  if cuda else "wall clock, one call",
        "setup_s": time.perf_counter() - t0,
        "beyond_largest_budget": fallback,
        "pixel_copies": copies,
    }
    path = os.path.join(out_dir(args), "fallback.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    rows = fallback["rows"]
    print(f"batch of {fallback['batch_tokens']} tokens, largest budget {fallback['largest_budget']}:")
    for name, row in rows.items():
        print(f"  {name:<40} {row['ms']:9.3f} ms  ({row['ms_per_1k_tokens']:.3f} ms per 1k tokens)")
    for entry in copies:
        print(f"  pixels, budget {entry['token_budget']}, {entry['fill_percent']}% full: clear+copy "
              f"{entry['clear_and_copy_us']:.1f} us, rows only {entry['copy_valid_rows_us']:.1f} us")
    print(f"wrote {path}")
    return 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
