"""Measures the Triton linear layer's tile and split-K configurations against cuBLAS, per layer GEMM and
budget, as the encoder runs them.

    python -m fused_moonvit.benchmarks.tune_gemm --out benchmarks/results

The four GEMMs of a layer (bf16, hidden 1152, MLP 4304), each with what the encoder does around it:
  qkv       x @ Wqkv.T + b                          cuBLAS: F.linear with its bias
  fc0_gelu  gelu_tanh(x @ W0.T + b)                 cuBLAS: torch._addmm_activation (cuBLASLt epilogue)
  wo_norm   add_layer_norm(residual, x @ Wo.T, b)   cuBLAS: F.linear without bias, then the same kernel
  fc1_norm  add_layer_norm(residual, g @ W1.T + b)  cuBLAS: F.linear with its bias, then the same kernel
where the Triton candidates with split_k > 1 hand their fp32 partial products to add_layer_norm.

Each measurement is one CUDA graph of 27 calls with 27 different weight tensors, as the 27 layers run
(together larger than the 50 MB L2, so weights come from HBM as in the encoder), median of do_bench,
per call. Every candidate's output is checked against cuBLAS's. Writes DIR/gemm_tuning.json: per GEMM
and budget every configuration's time and the fastest, from which the table in `moonvit/gemm.py` is
written by hand. CUDA only.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

from fused_moonvit.moonvit.cli import OneLineParser, output_dir

HIDDEN, MLP, LAYERS, EPS = 1152, 4304, 27, 1e-6
GEMMS = {"qkv": (HIDDEN, 3 * HIDDEN), "fc0_gelu": (HIDDEN, MLP), "wo_norm": (HIDDEN, HIDDEN), "fc1_norm": (MLP, HIDDEN)}
BUDGETS = (256, 512, 1024, 2048, 4096, 16384)

# (block_m, block_n, block_k, num_warps, num_stages)
SMALL_TILES = [(64, 64, 64, 4, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4),
               (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3)]
LARGE_TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
               (256, 128, 64, 8, 3), (128, 64, 64, 4, 4)]
SPLITS = (1, 2, 4)


def candidates(gemm: str, budget: int):
    tiles = SMALL_TILES if budget <= 2048 else LARGE_TILES
    splits = SPLITS if gemm.endswith("_norm") and budget <= 2048 else (1,)
    return [(tile, s) for tile in tiles for s in splits]


def graph_time_us(fn) -> float:
    from triton.testing import do_bench

    from fused_moonvit.moonvit.fused import capture_graph

    graph, _, _ = capture_graph(lambda: [fn(i) for i in range(LAYERS)], device=torch.cuda.current_device())
    return do_bench(graph.replay, warmup=20, rep=200, return_mode="median") * 1e3 / LAYERS


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m fused_moonvit.benchmarks.tune_gemm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_dir, default="benchmarks/results",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--gemms", help=f"comma-separated subset of {', '.join(GEMMS)}")
    parser.add_argument("--budgets", help=f"comma-separated budgets (default: {','.join(map(str, BUDGETS))})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    names = args.gemms.split(",") if args.gemms else list(GEMMS)
    unknown = [n for n in names if n not in GEMMS]
    if unknown:
        parser.error(f"unknown GEMMs {unknown}; choose from {list(GEMMS)}")
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else list(BUDGETS)

    import triton

    from fused_moonvit.kernels.gemm import GemmConfig, linear
    from fused_moonvit.kernels.layernorm import add_layer_norm

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)

    ln_w, ln_b = 1 + rand(HIDDEN, scale=0.1), rand(HIDDEN, scale=0.1)
    results = {}
    for name in names:
        k, n = GEMMS[name]
        weights = [rand(n, k, scale=k**-0.5) for _ in range(LAYERS)]
        biases = [rand(n, scale=0.1) for _ in range(LAYERS)]
        results[name] = {}
        for budget in budgets:
            x = rand(budget, k)
            resid = rand(budget, HIDDEN)
            norm = name.endswith("_norm")

            def cublas(i):
                w, b = weights[i], biases[i]
                if name == "qkv":
                    return F.linear(x, w, b)
                if name == "fc0_gelu":
                    return torch._addmm_activation(b, x, w.t(), use_gelu=True)
                if name == "wo_norm":
                    return add_layer_norm(resid, F.linear(x, w), ln_w, ln_b, EPS, bias=b)
                return add_layer_norm(resid, F.linear(x, w, b), ln_w, ln_b, EPS)

            def triton_fn(cfg):
                def fn(i):
                    w, b = weights[i], biases[i]
                    if not norm:
                        return linear(x, w, b, gelu=name == "fc0_gelu", config=cfg)
                    if cfg.split_k > 1:
                        return add_layer_norm(resid, linear(x, w, config=cfg), ln_w, ln_b, EPS, bias=b)
                    if name == "wo_norm":
                        return add_layer_norm(resid, linear(x, w, config=cfg), ln_w, ln_b, EPS, bias=b)
                    return add_layer_norm(resid, linear(x, w, b, config=cfg), ln_w, ln_b, EPS)
                return fn

            # The residual is updated in place by the *_norm steps; check on a copy, one layer.
            saved = resid.clone()
            want = cublas(0).float()
            resid.copy_(saved)
            base_us = graph_time_us(cublas)
            flops = 2 * budget * k * n
            row = {"cublas_us": base_us, "cublas_tflops": flops / base_us / 1e6, "configs": {}}
            for (bm, bn, bk, warps, stages), split in candidates(name, budget):
                cfg = GemmConfig(bm, bn, bk, split, 8, warps, stages)
                key = f"{bm}x{bn}x{bk}/w{warps}/s{stages}/k{split}"
                fn = triton_fn(cfg)
                try:
                    resid.copy_(saved)
                    got = fn(0).float()
                    torch.cuda.synchronize()
                    err = ((got - want).norm() / want.norm()).item()
                    us = graph_time_us(fn)
                except Exception as exc:  # a configuration that does not fit (shared memory) is skipped
                    row["configs"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                    continue
                row["configs"][key] = {"us": us, "tflops": flops / us / 1e6, "rel_err_vs_cublas": err,
                                       "speedup": base_us / us}
            ok = {c: v for c, v in row["configs"].items() if "us" in v and v["rel_err_vs_cublas"] < 2e-2}
            if not ok:
                print(f"error: {name} at {budget}: no configuration ran and matched cuBLAS: {row['configs']}",
                      file=sys.stderr)
                return 1
            best = min(ok, key=lambda c: ok[c]["us"])
            row.update(best=best, best_us=ok[best]["us"], best_speedup=base_us / ok[best]["us"])
            results[name][budget] = row
            print(f"{name:9s} B={budget:6d} cuBLAS {base_us:8.2f} us ({flops / base_us / 1e6:5.0f} TF/s)  "
                  f"best {best:22s} {ok[best]['us']:8.2f} us  {base_us / ok[best]['us']:.2f}x", flush=True)
            for c, v in sorted(row["configs"].items(), key=lambda kv: kv[1].get("us", 1e9))[:6]:
                print(f"    {c:22s} " + (f"{v['us']:8.2f} us err {v['rel_err_vs_cublas']:.1e}" if "us" in v
                                         else v["error"]))
            resid.copy_(saved)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gemm_tuning.json")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "-m", "fused_moonvit.benchmarks.tune_gemm",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "layers_per_graph": LAYERS, "gemms": results}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
