"""`fused-moonvit bench profile`: where the fused encoder's time goes, per kernel category (CUDA only).

For each set (images, the sizes Kimi-K2.5 users send and, for MoonViT3d, video sets): the whole `MoonVitGraphRunner.encode` call and a bare graph replay, timed with CUDA
events (median), then the device time of every kernel of the same forward from `torch.profiler`, summed
by category (GEMMs, attention, the add + LayerNorm kernel, the position-embedding, RoPE, merge and plan
kernels, PyTorch's LayerNorm and GELU where they remain, other elementwise), with the launch count. The
profiler traces the eager forward, whose kernels are the graph's; replay minus the kernels' sum is
time the GPU spends between kernels inside the graph. `--attention triton` profiles the encoder with its own
attention kernel forced (the "before" of a backend change); by default the backend `choose_attention`
picks runs. Writes DIR/profile.json (profile-MODEL.json for Kimi-K2.5 / K3, with -ATTENTION for a forced
backend) and prints a table.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from collections import defaultdict

import torch

from fused_moonvit.benchmarks.bench_encoder import MODELS
from fused_moonvit.benchmarks.common import measure, versions
from fused_moonvit.benchmarks.image_sets import PADDED_EXACT, measured_sets
from fused_moonvit.benchmarks.image_sets import patches as image_patches
from fused_moonvit.benchmarks.outdir import add_out_argument, out_dir
from fused_moonvit.moonvit.arguments import OneLineParser, positive_int
from fused_moonvit.moonvit.attention import BACKENDS

# First match wins; kernel names are lower-cased.
CATEGORIES = [
    ("pos-embed kernel", ("_interp_pos_embed",)),
    ("rope kernel", ("_rope_2d",)),
    ("merge kernel", ("_merge_patches",)),
    ("plan expand kernel", ("_expand_plan",)),
    ("attention (Triton)", ("_varlen_attention",)),
    ("attention (FlashAttention-2, PyTorch)", ("pytorch_flash",)),
    ("attention (FlashAttention-3, vLLM)", ("flashattnfwdsm90", "prepare_varlen", "flash")),
    ("attention (other)", ("fmha", "attention")),
    ("add + layernorm kernel", ("_add_layer_norm",)),
    ("layernorm (PyTorch)", ("layer_norm", "layernorm")),
    # Before "gelu": cuBLASLt's GEMMs with the bias + GELU epilogue carry "gelu" in their names.
    ("GEMMs (cuBLAS)", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas", "splitk")),
    ("gelu (PyTorch)", ("gelu",)),
    ("elementwise (residual adds, copies)", ("elementwise", "copy", "add", "fill")),
]


def category(kernel_name: str) -> str:
    name = kernel_name.lower()
    for label, needles in CATEGORIES:
        if any(n in name for n in needles):
            return label
    return "other"


def _kernel_times_us(fn, iters: int) -> tuple[dict[str, float], float]:
    """Per kernel name: total device µs over one call, from the profiler's kernel events; and the number
    of kernel launches per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    launches = 0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.device_time_total / iters
            launches += 1
    return dict(per_kernel), launches / iters


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="fused-moonvit bench profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="1x224,1x448",
                        help="comma-separated image sets or padded cases of docs/design.md section 4.2 "
                             "(default: %(default)s)")
    add_out_argument(parser, "profile.json", smoke=False)
    parser.add_argument("--iters", type=positive_int, default=30, help="timed calls (default: %(default)s)")
    parser.add_argument("--model", choices=list(MODELS), default="kimi-vl",
                        help="whose tower, at its real sizes (default: %(default)s)")
    parser.add_argument("--attention", choices=list(BACKENDS),
                        help="force this attention backend (default: the one choose_attention picks)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profiling needs a CUDA device")
    available = measured_sets(video=args.model != "kimi-vl")
    names = args.sets.split(",")
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown image sets {unknown}; known: {sorted(available)}")

    from fused_moonvit.moonvit import FusedMoonVit, MoonVitConfig, MoonVitGraphRunner, build_model
    from fused_moonvit.moonvit.runner import graph_body

    config = MoonVitConfig(**MODELS[args.model])
    model = build_model(FusedMoonVit, None, config=config, dtype=torch.bfloat16, device="cuda")
    model.attention_backend = args.attention

    results = {}
    for index, name in enumerate(names):
        grids, budget = available[name]
        runner = MoonVitGraphRunner(model, budgets=[budget], max_items=16)
        runner.capture(progress=False)
        patches = image_patches(grids)
        gen = torch.Generator().manual_seed(index)
        p = config.patch_size
        pixels = (torch.rand(patches, 3, p, p, generator=gen) * 2 - 1).to("cuda", torch.bfloat16)
        grid = torch.tensor(grids)
        call_ms = measure(lambda: runner.encode(pixels, grid), cuda=True, iters=args.iters, warmup=3)["ms"]
        replay_ms = measure(runner.graphs[budget].replay, cuda=True, iters=args.iters, warmup=0)["ms"]
        # The eager forward on the graph's buffers as the last call left them: the graph's kernels.
        def graph_kernels():
            return graph_body(model, runner.pixels[:budget], runner.device_plan)

        graph_kernels()
        kernels, launches = _kernel_times_us(graph_kernels, 5)
        by_cat: dict[str, float] = defaultdict(float)
        for kname, us in kernels.items():
            by_cat[category(kname)] += us
        kernel_ms = sum(kernels.values()) / 1e3
        attention_us = sum(us for cat, us in by_cat.items() if cat.startswith("attention"))
        results[name] = {
            "grids": [list(g) for g in grids], "budget": budget, "patches": patches,
            "attention_backend": runner.attention_choice(budget).backend,
            "whole_call_ms": call_ms, "graph_replay_ms": replay_ms, "kernel_sum_ms": kernel_ms,
            "gaps_inside_graph_ms": replay_ms - kernel_ms, "host_and_copies_ms": call_ms - replay_ms,
            "kernel_launches_per_call": launches,
            "attention_share_of_kernels": attention_us / 1e3 / kernel_ms,
            "by_category_us": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top_kernels_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12]),
        }
        del runner
        torch.cuda.empty_cache()
    for name, exact in PADDED_EXACT.items():
        if name in results and exact in results:
            results[name]["attention_share_vs_exact"] = (results[name]["attention_share_of_kernels"]
                                                         / results[exact]["attention_share_of_kernels"])

    report = {
        "benchmark": "profile", "device": torch.cuda.get_device_name(), "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["fused-moonvit", "bench", "profile", *(sys.argv[1:] if argv is None else argv)]), "model": args.model, "config": "random bf16 weights, real size",
        "attention": args.attention or "chosen (choose_attention)",
        "sets": results,
    }
    stem = "profile" + ("" if args.model == "kimi-vl" else f"-{args.model}") + (f"-{args.attention}" if args.attention else "")
    path = os.path.join(out_dir(args), f"{stem}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    for name, r in results.items():
        print(f"{name} ({r['patches']} patches in {r['budget']}, {r['attention_backend']} attention): whole call {r['whole_call_ms']:.3f} ms = replay "
              f"{r['graph_replay_ms']:.3f} ms (kernels {r['kernel_sum_ms']:.3f}, gaps {r['gaps_inside_graph_ms']:.3f}) "
              f"+ host and copies {r['host_and_copies_ms']:.3f}; {r['kernel_launches_per_call']:.0f} launches; attention {100 * r['attention_share_of_kernels']:.1f}%"
              + (f" ({r['attention_share_vs_exact']:.2f}x its exact budget's share)"
                 if "attention_share_vs_exact" in r else ""))
        for cat, us in r["by_category_us"].items():
            print(f"    {cat:40s} {us:9.1f} us  {100 * us / 1e3 / r['kernel_sum_ms']:5.1f}%")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
