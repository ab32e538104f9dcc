"""Measures the Triton attention kernel's tile configurations against FlashAttention-2, per budget.

    python -m fused_moonvit.benchmarks.tune_attention --out benchmarks/results

For each case (a budget and the images in it, exact and padded, of the benchmark image sets in
docs/design.md section 4.2), every candidate configuration and FlashAttention-2 varlen (called as the encoder called
it: the plan's cu_seqlens with its padding sequence, max_seqlen = B) run on the same random bf16 qkv,
16 heads of 72, inside a CUDA graph of 5 back-to-back calls (the inputs stay where the QKV GEMM left
them, as in the encoder), median of do_bench. Each configuration's output is checked against an fp32
reference. Writes DIR/attention_tuning.json: per case every configuration's time and error and the
fastest one, from which the per-budget table in `moonvit/attention.py` is written by hand. CUDA only.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch

from fused_moonvit.benchmarks.flops import attention_flops
from fused_moonvit.benchmarks.image_sets import IMAGE_SETS, patches
from fused_moonvit.moonvit.inputs import patch_offsets
from fused_moonvit.moonvit.arguments import OneLineParser, output_dir

MIX8 = IMAGE_SETS["mix8"]
CASES = {
    # name: (budget in patches, grids)
    "1x256": (256, IMAGE_SETS["1x224"]),
    "1x256-in-1024": (1024, IMAGE_SETS["1x224"]),
    "1x1024": (1024, IMAGE_SETS["1x448"]),
    "1x1024-in-2048": (2048, IMAGE_SETS["1x448"]),
    "4x1024": (4096, IMAGE_SETS["4x448"]),
    "1x4096-in-4096": (4096, IMAGE_SETS["1x896"]),
    "2x4096": (8192, IMAGE_SETS["2x896"]),
    "1x4096-in-8192": (8192, IMAGE_SETS["1x896"]),
    "mix8": (10368, MIX8),
    "mix8-in-11264": (11264, MIX8),
    "mix8-in-16384": (16384, MIX8),
    "16x1024": (16384, IMAGE_SETS["16x448"]),
}

# (block_m, block_n, num_warps, num_stages)
CONFIGS = [
    (32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2),
    (64, 128, 4, 2), (64, 128, 8, 2), (128, 32, 8, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2), (128, 32, 4, 2), (64, 64, 4, 4),
]
CALLS = 5
SLOTS = 64


def graph_time_us(fn) -> float:
    from triton.testing import do_bench

    from fused_moonvit.moonvit.runner import capture_graph

    graph, _, _ = capture_graph(lambda: [fn() for _ in range(CALLS)], device=torch.cuda.current_device())
    return do_bench(graph.replay, warmup=20, rep=150, return_mode="median") * 1e3 / CALLS


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m fused_moonvit.benchmarks.tune_attention",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_dir, default="benchmarks/results",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--cases", help=f"comma-separated subset of {', '.join(CASES)}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")

    import triton
    from torch.nn.attention.varlen import varlen_attn

    from fused_moonvit.kernels import build_plan, new_device_plan, plan_cu_seqlens, upload_plan
    from fused_moonvit.kernels.attention import AttentionConfig, varlen_attention_fwd, varlen_attention_reference

    heads, hd = 16, 72
    gen = torch.Generator().manual_seed(0)
    results = {}
    for name in names:
        budget, grids = CASES[name]
        cu = plan_cu_seqlens(upload_plan(build_plan(grids, budget, SLOTS), new_device_plan(SLOTS, "cuda")))
        # The images alone, without slots or padding: FlashAttention-2 at its best, and the reference.
        tight_cu = cu.new_tensor(patch_offsets(grids))
        qkv = torch.randn(budget, 3 * heads * hd, generator=gen).to("cuda", torch.bfloat16)
        valid = patches(grids)
        exact = varlen_attention_reference(qkv[:valid].float(), tight_cu, heads, hd, pad_last=False)
        flops = attention_flops(grids, heads * hd)
        q, k, v = qkv.view(budget, 3, heads, hd).unbind(1)
        fa2 = graph_time_us(lambda: varlen_attn(q, k, v, cu, cu, budget, budget))
        longest = max(h * w for h, w in grids)
        qv, kv, vv = (t[:valid] for t in (q, k, v))
        fa2_tight = graph_time_us(lambda: varlen_attn(qv, kv, vv, tight_cu, tight_cu, longest, longest))
        row = {"budget": budget, "grids": grids, "valid_rows": valid, "flops_72wide": flops,
               "fa2_us": fa2, "fa2_tight_us": fa2_tight, "configs": {}}
        out = torch.empty(budget, heads * hd, device="cuda", dtype=torch.bfloat16)
        for bm, bn, warps, stages in CONFIGS:
            cfg = AttentionConfig(bm, bn, warps, stages)
            key = f"{bm}x{bn}/w{warps}/s{stages}"
            try:
                varlen_attention_fwd(qkv, cu, heads, hd, config=cfg, out=out)
                torch.cuda.synchronize()
                err = ((out[:valid].double() - exact.double()).norm() / exact.double().norm()).item()
                pad_ok = bool(out[valid:].eq(0).all())
                us = graph_time_us(lambda: varlen_attention_fwd(qkv, cu, heads, hd, config=cfg, out=out))
            except Exception as exc:  # a configuration that does not compile (shared memory) is skipped
                row["configs"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                continue
            row["configs"][key] = {"us": us, "tflops": flops / us / 1e6, "rel_err": err, "padding_zero": pad_ok,
                                   "speedup_vs_fa2": fa2 / us}
        ok = {k: c for k, c in row["configs"].items() if "us" in c and c["rel_err"] < 1e-2 and c["padding_zero"]}
        if not ok:
            print(f"error: {name}: no configuration compiled and matched the reference: {row['configs']}",
                  file=sys.stderr)
            return 1
        best = min(ok, key=lambda k: ok[k]["us"])
        row["best"] = best
        row["best_us"] = ok[best]["us"]
        row["best_speedup_vs_fa2"] = fa2 / ok[best]["us"]
        results[name] = row
        print(f"{name:16s} B={budget:6d} fa2 {fa2:8.1f} us (tight {fa2_tight:8.1f})  best {best:16s} "
              f"{ok[best]['us']:8.1f} us  {fa2 / ok[best]['us']:.2f}x  {flops / ok[best]['us'] / 1e6:.0f} TFLOP/s",
              flush=True)
        for key, c in sorted(row["configs"].items(), key=lambda kv: kv[1].get("us", 1e9)):
            print(f"    {key:16s} " + (f"{c['us']:8.1f} us err {c['rel_err']:.1e}" if "us" in c else c["error"]))

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention_tuning.json")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "-m", "fused_moonvit.benchmarks.tune_attention",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "heads": heads, "head_dim": hd, "slots": SLOTS, "calls_per_graph": CALLS, "cases": results}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
