"""`fused-moonvit bench encoder`: the whole encoder call, fused graph against what vLLM users run.

For each set (docs/design.md section 4.2: the image sets, the sizes Kimi-K2.5 users send, the padded cases
and, for MoonViT3d, video sets), in one run on the same random weights and inputs, these rows:
- "reference eager": `MoonVitReference.forward`, the golden model (timed only if asked for by --rows);
- "vLLM's way, FA3" and "vLLM's way, FA2": vLLM 0.34's encoder path rebuilt (benchmarks/hostmeta.py): the
  call's images through its host-metadata graph, its video chunks through its eager MoonViT3d, with the
  attention vLLM runs on Hopper (its own FlashAttention-3, loaded from vLLM or $FUSED_MOONVIT_FA3_LIB) or
  PyTorch's FlashAttention-2. "vLLM" in every ratio means the FA3 row where FA3 runs, else the FA2 row;
- "fused graph, Triton attn": this encoder with its own Triton attention forced;
- "fused graph": this encoder with the attention `choose_attention` picks (`MoonVitGraphRunner.encode`);
- "fused, default runner": `MoonVitGraphRunner(model)` as the Python API's user builds it (the default
  budget ladder and item slots), captured once before the sets.
Every other graph row replays one graph of the set's budget: its patch count rounded up to 64, or the
padded case's budget; the default runner replays the smallest of its budgets that holds the set. Each row
times the whole call, host work included: CUDA events around the call on an idle GPU, median of `--iters`
calls after `--warmup`. Writes DIR/encoder.json and DIR/encoder.png (with
`--model kimi-k25` or `kimi-k3`: encoder-kimi-k25.json and .png, and so on), DIR being `--out`,
benchmarks/results by default.

`--smoke` runs on the CPU with a tiny config and tiny sets, one call per path and wall-clock times,
so that CI can run the script end to end; its figures mean nothing, and it writes into a new temporary
directory unless `--out` names another (never benchmarks/results).
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
from collections.abc import Callable

import torch

from fused_moonvit.benchmarks.common import SMOKE_CONFIG, add_run_arguments, measure, rel_err, versions
from fused_moonvit.benchmarks.flops import encoder_flops, encoder_flops_breakdown
from fused_moonvit.benchmarks.image_sets import budgeted_sets, measured_sets
from fused_moonvit.benchmarks.image_sets import patches as image_patches
from fused_moonvit.benchmarks.outdir import add_out_argument, out_dir, parse_benchmark_args
from fused_moonvit.moonvit.arguments import DTYPES, OneLineParser
from fused_moonvit.moonvit.config import MoonVitConfig
from fused_moonvit.moonvit.families import FAMILIES

GEMM_CEILING_TFLOPS = 794.0  # bf16, 8192^3, measured on this project's H200 (docs/design.md section 4.3)

ROWS = {
    "reference_eager": "reference eager",
    "vllm_fa2": "vLLM's way, FA2",
    "vllm_fa3": "vLLM's way, FA3",
    "fused_triton": "fused graph, Triton attn",
    "fused_gluon": "fused graph, Gluon attn",
    "fused_graph": "fused graph",
    "fused_default": "fused, default runner",
}

# The fused graph's speedup over vLLM's way with the attention vLLM runs (FA3 on Hopper), whole call,
# Kimi-K2.5 at real size, bf16 (this round's targets; docs/design.md section 15).
TARGET_SPEEDUP_VS_VLLM = {"photo16k": 1.3, "chunk16k": 1.3, "2photos8k": 1.4, "1x896": 1.3, "2x896": 1.3,
                          "16x448": 5.5, "1x448": 4.5}

SMOKE_SETS = {
    "1x4x4": [(4, 4)],
    "3mix": [(4, 6), (2, 2), (20, 8)],  # 20 rows > the 16-row table: upsampling on one axis
}
SMOKE_PADDED = {"3mix-in-512": (SMOKE_SETS["3mix"], 512)}
SMOKE_VIDEO_SETS = {"video-mix": [(1, 4, 6), (4, 4, 4), (2, 6, 2)]}

# The towers --model picks, at their real sizes: each family's benchmark configuration.
MODELS = {name: dict(family.benchmark) for name, family in FAMILIES.items()}


def vllm_call(host_graph, eager, pixels: torch.Tensor, grids: list) -> Callable[[], torch.Tensor]:
    """One call as vLLM 0.34 makes it: the images through the host-metadata graph, the video chunks
    through one eager tower call, outputs put back in item order."""
    from fused_moonvit.kernels.items import Items

    items = Items.of(grids)
    starts = items.offsets
    groups = [[i for i, (t, _, _) in enumerate(items) if (t == 1) == image] for image in (True, False)]
    runs = []
    for members, run in zip(groups, (host_graph, eager)):
        if members:
            member_pixels = torch.cat([pixels[starts[i]:starts[i + 1]] for i in members])
            member_grid = torch.tensor([items.rows[i] for i in members], dtype=torch.int64)
            runs.append((members, run, member_pixels, member_grid))

    def call() -> torch.Tensor:
        out: list[torch.Tensor | None] = [None] * len(items)
        for members, run, member_pixels, member_grid in runs:
            sizes = [items.tokens[i] for i in members]
            for i, o in zip(members, run(member_pixels, member_grid).split(sizes)):
                out[i] = o
        return torch.cat(out)

    return call


ROW_MEANINGS = {
    "reference_eager": "MoonVitReference: eager, per-item bicubic, SDPA per item; the errors' reference",
    "vllm_fa2": "vLLM 0.34's way (benchmarks/hostmeta.py): images through the host-metadata graph, video "
                "chunks through the eager tower in one call; PyTorch's FlashAttention-2",
    "vllm_fa3": "as vllm_fa2, with vLLM 0.34's own FlashAttention-3 (_vllm_fa3_C), which vLLM runs ViT "
                "attention on on Hopper",
    "fused_triton": "the fused graph with its Triton attention forced",
    "fused_gluon": "the fused graph with its Gluon attention (Hopper) forced",
    "fused_graph": "the fused graph with the attention choose_attention picks (the row's 'attention')",
    "fused_default": "MoonVitGraphRunner(model) with its defaults (default_budgets(), 64 item slots), captured once "
                     "before the sets; the row's 'budgets' are the graphs the set replays",
}


def _timed_rows(args, parser, runnable: list[str]) -> list[str]:
    if not args.rows:
        return runnable
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad or not names:
        parser.error(f"unknown row(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(ROWS)}")
    return [n for n in runnable if n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fused-moonvit bench encoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", help="comma-separated image sets and padded cases (default: all, or the "
                                       "smoke sets with --smoke)")
    add_out_argument(parser, "encoder.json and encoder.png (encoder-MODEL.json and .png with --model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="weights and activations (default: bfloat16; float32 with --smoke)")
    parser.add_argument("--model", choices=list(MODELS), default="kimi-vl",
                        help="whose tower, at its real sizes (default: %(default)s); MoonViT3d ones add video sets")
    parser.add_argument("--rows", help=f"comma-separated rows to time, of {', '.join(ROWS)} (default: all "
                                       "that run here; the reference's output is always computed, for the errors)")
    add_run_arguments(parser, smoke="CPU, tiny config and sets, one call per path: checks the script, "
                                    "measures nothing")
    return parser


def _image_sets(args, parser) -> dict[str, tuple[list[tuple[int, int]], int]]:
    """name -> (grids, budget): the exact sets at their patch count rounded up to 64, and the padded cases."""
    video = args.model != "kimi-vl"
    if args.smoke:
        available = budgeted_sets({**SMOKE_SETS, **(SMOKE_VIDEO_SETS if video else {})}, SMOKE_PADDED)
    else:
        available = measured_sets(video)
    if not args.sets:
        return available
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        parser.error(f"unknown image set(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(available)}")
    return {n: available[n] for n in names}


def _targets(results: list[dict], applies: bool) -> list[dict]:
    by_name = {r["name"]: r for r in results}
    targets = []
    for name, factor in TARGET_SPEEDUP_VS_VLLM.items():
        if name in by_name and "vllm" in by_name[name]["speedup_of_fused_over"]:
            speedup = by_name[name]["speedup_of_fused_over"]["vllm"]
            targets.append({"set": name, "what": f"fused graph speedup over {by_name[name]['vllm_row']}",
                            "target": f">= {factor}", "measured": speedup,
                            "met": (speedup >= factor) if applies else None})
    return targets


def _table(results: list[dict], targets: list[dict]) -> str:
    head = (f"{'set':<14} {'patches':>7} {'budget':>6} {'row':<25} {'ms':>9} {'host ms':>9} {'TFLOP/s':>8} "
            f"{'% peak':>7} {'fused x':>8} {'rel err':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        for key, row in r["rows"].items():
            speedup = r["speedup_of_fused_over"].get(key)
            err = r["rel_err_vs_reference_eager"].get(key)
            lines.append(f"{r['name']:<14} {r['patches']:>7} {r['budget']:>6} {ROWS[key]:<25} {row['ms']:>9.3f} "
                         f"{row['host_ms']:>9.3f} "
                         f"{row['tflops']:>8.1f} {row['pct_of_ceiling']:>6.1f}% "
                         f"{'' if speedup is None else f'{speedup:.2f}x':>8} "
                         f"{'' if err is None else f'{err:.2e}':>9}")
    if targets:
        lines.append("")
        for t in targets:
            status = {True: "met", False: "MISSED",
                      None: "n/a (the targets are for the full model in bfloat16 on the GPU)"}[t["met"]]
            lines.append(f"target {t['set']}: {t['what']} {t['target']}: {t['measured']:.3f} -> {status}")
    return "\n".join(lines)


def _plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(1.9 * len(results) + 3, 5.2))
    keys = [k for k in ROWS if all(k in r["rows"] for r in results)]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        label = ROWS[key]
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(results))]
        ms = [r["rows"][key]["ms"] for r in results]
        bars = ax.bar(xs, ms, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in ms], fontsize=6, padding=2, rotation=90)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(range(len(results)), [f"{r['name']}\n{r['patches']} in {r['budget']}" for r in results],
                  fontsize=7)
    ax.set_ylabel("whole call, ms (log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, argv = parse_benchmark_args(parser, argv)
    cuda = not args.smoke
    dtype = DTYPES[args.dtype or ("float32" if args.smoke else "bfloat16")]
    if cuda and dtype == torch.float32:
        parser.error("varlen attention (FlashAttention) runs in bfloat16 or float16 only")
    if args.warmup < 0:
        parser.error(f"argument --warmup: must be >= 0, got {args.warmup}")
    sets = _image_sets(args, parser)
    try:  # fail before the long run, not after it
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error('the plot needs matplotlib: pip install -e ".[bench]" in the fused-moonvit checkout')

    if not cuda:
        # The fused kernels need Triton's interpreter on the CPU; Triton reads this when they are first
        # imported, which is below unless a caller imported them already.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from tqdm import tqdm

    from fused_moonvit.benchmarks.hostmeta import HostMetadataGraph, VllmEagerTower, baseline_rope
    from fused_moonvit.moonvit import FusedMoonVit, MoonVitGraphRunner, MoonVitReference, build_model
    from fused_moonvit.moonvit.attention import backend_available

    device = torch.device("cuda" if cuda else "cpu")
    fields = dict(MODELS[args.model])
    if args.smoke:
        fields.update(SMOKE_CONFIG)
        if args.model == "kimi-k3":
            fields["qkv_hidden_size"] = 64  # K3's wider qkv: head dim 16 for the smoke's 4 heads
    if args.layers is not None:
        fields["num_hidden_layers"] = args.layers
    config = MoonVitConfig(**fields)
    # vLLM's way runs FA3 where vLLM would (Hopper); the FA2 row is kept beside it everywhere.
    # Rows whose attention cannot run here (FA3 and Gluon off Hopper) are left out.
    needs = {"vllm_fa3": "fa3", "fused_gluon": "gluon"}
    runnable = [k for k in ROWS if k not in needs or backend_available(needs[k], device, config.head_dim)]
    timed = _timed_rows(args, parser, runnable)
    vllm_key = "vllm_fa3" if "vllm_fa3" in runnable else "vllm_fa2"
    t0 = time.perf_counter()
    ref = build_model(MoonVitReference, config=config, dtype=dtype, device=device, seed=args.seed)
    with torch.device(device):
        fused = FusedMoonVit(config)
    fused = fused.to(dtype).eval()
    fused.load_state_dict(ref.state_dict())

    max_images = max(len(g) for g, _ in sets.values())
    setup_s = time.perf_counter() - t0

    # The Python API's default runner, captured once for every set, with the attention choose_attention
    # picks (a graph keeps the backend it was captured with).
    default_runner, default_info = None, None
    if "fused_default" in timed:
        default_runner = MoonVitGraphRunner(fused)
        t1 = time.perf_counter()
        if cuda:
            default_runner.capture(progress=False)
        default_info = {"budgets": default_runner.budgets, "max_items": default_runner.max_items,
                        "capture_s": time.perf_counter() - t1 if cuda else None,
                        "graph_memory_bytes": sum(default_runner.graph_memory().values()) if cuda else None}

    results = []
    timing = dict(cuda=cuda, iters=args.iters, warmup=args.warmup)
    with tqdm(total=len(sets) * len(timed), desc="encoder benchmark", unit="row", file=sys.stderr) as bar:
        for index, (name, (grids, budget)) in enumerate(sets.items()):
            patches = image_patches(grids)
            gen = torch.Generator().manual_seed(args.seed + 1 + index)
            pixels = (torch.rand(patches, 3, config.patch_size, config.patch_size, generator=gen) * 2 - 1)
            pixels = pixels.to(device=device, dtype=dtype)
            grid = torch.tensor(grids, dtype=torch.int64)
            flops = encoder_flops(grids, config)
            has_images = any(len(g) == 2 or g[0] == 1 for g in grids)

            rows, outputs = {}, {}

            def run_row(key: str, call: Callable[[], torch.Tensor], **extra) -> None:
                bar.set_postfix_str(f"{name}: {ROWS[key]}")
                outputs[key] = call()
                if key in timed:
                    rows[key] = {**measure(call, **timing), **extra}
                    bar.update()

            run_row("reference_eager", lambda: ref(pixels, grid))
            for key in ("vllm_fa2", "vllm_fa3"):
                if key not in runnable:
                    continue
                attention = key.removeprefix("vllm_")
                host_graph = HostMetadataGraph(ref, budget, max_images, attention=attention) if has_images else None
                run_row(key, vllm_call(host_graph, VllmEagerTower(ref, attention), pixels, grids), budget=budget)
                del host_graph  # frees its graph's private memory pool before the next row

            for key, attention in (("fused_triton", "triton"), ("fused_gluon", "gluon"), ("fused_graph", None)):
                if key not in runnable:
                    continue
                # One graph of exactly this budget. The backend holds for the whole row: a graph bakes it
                # in at capture, and on the CPU every call runs the forward again.
                fused.attention_backend = attention
                try:
                    runner = MoonVitGraphRunner(fused, budgets=[budget], max_items=max_images)
                    if cuda:
                        runner.capture(progress=False)
                    run_row(key, lambda: torch.cat(runner.encode(pixels, grid)), budget=budget,
                            graph_memory_bytes=runner.graph_memory().get(budget),
                            attention=runner.attention_choice(budget).backend)
                    del runner
                finally:
                    fused.attention_backend = None

            if default_runner is not None:
                replays = [b for _, _, b in default_runner.plan_chunks(grid)]
                run_row("fused_default", lambda: torch.cat(default_runner.encode(pixels, grid)), budgets=replays,
                        attention=[default_runner.attention_choice(b).backend if b else "eager" for b in replays])

            for row in rows.values():
                row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                row["pct_of_ceiling"] = 100.0 * row["tflops"] / GEMM_CEILING_TFLOPS
            speedups = {}
            if "fused_graph" in rows:
                fused_ms = rows["fused_graph"]["ms"]
                speedups = {k: r["ms"] / fused_ms for k, r in rows.items() if k != "fused_graph"}
                if vllm_key in rows:
                    speedups["vllm"] = speedups[vllm_key]
            results.append({
                "name": name,
                "grids": [list(g) for g in grids],
                "items": len(grids),
                "patches": patches,
                "output_tokens": sum(g[-2] * g[-1] // 4 for g in grids),
                "flops": flops,
                "flops_breakdown": encoder_flops_breakdown(grids, config),
                "rows": rows,
                "budget": budget,
                "vllm_row": ROWS[vllm_key],
                "speedup_of_fused_over": speedups,
                "rel_err_vs_reference_eager": {k: rel_err(v, outputs["reference_eager"])
                                               for k, v in outputs.items() if k != "reference_eager"},
                "outputs_finite": {k: bool(torch.isfinite(v).all()) for k, v in outputs.items()},
            })
            if cuda:
                torch.cuda.empty_cache()

    # The targets are Kimi-K2.5's, against vLLM's FA3 way on Hopper.
    full_run = (cuda and dtype == torch.bfloat16 and args.layers is None and args.model == "kimi-k25"
                and vllm_key == "vllm_fa3")
    targets = _targets(results, applies=full_run)
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = {
        "benchmark": "encoder",
        "device": device_name,
        "versions": versions(),
        "date": date,
        "command": shlex.join(["fused-moonvit", "bench", "encoder", *argv]),
        "bench_args": argv,
        "smoke": args.smoke,
        "model": args.model,
        "dtype": str(dtype).removeprefix("torch."),
        "config": {k: getattr(config, k) for k in MoonVitConfig._FIELDS},
        "seed": args.seed,
        "weights": "random (build_model seed), shared by all rows",
        "gemm_ceiling_tflops": GEMM_CEILING_TFLOPS,
        "flops_counted": "matrix products only (patch embed, layer GEMMs, attention, projector), padding excluded",
        "budgets": ("per set: its patch count rounded up to 64, or the padded case's budget; every graph "
                    "row but fused_default replays one graph of exactly that budget"),
        "max_images": max_images,
        "default_runner": default_info,
        "rows": {**ROW_MEANINGS, "vllm": f"the ratios' 'vllm' is {ROWS[vllm_key]!r}, what vLLM runs here"},
        "baseline_rope": baseline_rope(config.tower),
        "setup_s": setup_s,
        "sets": results,
        "targets_apply": full_run,
        "targets": targets,
    }

    out = out_dir(args)
    stem = "encoder" if args.model == "kimi-vl" else f"encoder-{args.model}"
    json_path = os.path.join(out, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    png_path = os.path.join(out, f"{stem}.png")
    _plot(results, png_path, f"{args.model} encoder, whole call: {device_name}, {report['dtype']}, "
                             f"{config.num_hidden_layers} layers, torch {torch.__version__}")
    print(_table(results, targets))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
