"""The Gluon attention's tile configurations on a Hopper GPU, the sweep behind docs/design.md section 15:

    python -m fused_moonvit.benchmarks.gluon_sweep check 0,1,2,3,4,5,6   # against fp64, FA3's error beside
    CFGS=3,6 python -m fused_moonvit.benchmarks.gluon_sweep time TAG      # against FA3 and the Triton kernel
    HEAD_DIMS=1 ...                                                        # head dim 72 only (2: and 128)
    REPEATS=3 ...                                                          # three interleaved rounds

`check`: each configuration (by index into CONFIGS) on random plans at head dims 72, 128 and 64 (a 16384
patch photo, a mix with a chunk and items shorter than a tile, NaN in the padding), its error against fp64
beside FA3's on the same input, padding rows zeros, and NaN / Inf in one sequence kept there. `time`: one
call as the encoder makes it (64 slots, max_seqlen = the budget, five calls in a CUDA graph, do_bench
median with L2 flushed) at 1x16384, 1x4096, 16x1024 and 1x1024 patches. Writes check.json or time-TAG.json
into $OUT (default /tmp/out). CUDA only; FA3 where it loads ($FUSED_MOONVIT_FA3_LIB).
"""

import json
import os
import statistics
import sys
import time

import torch

from fused_moonvit.benchmarks.common import graph_time_us, rel_err
from fused_moonvit.kernels import build_plan, new_device_plan, plan_cu_seqlens, upload_plan
from fused_moonvit.kernels.attention import AttentionConfig, varlen_attention_reference
from fused_moonvit.kernels.attention_gluon import GluonAttentionConfig, config_unsupported, gluon_attention_fwd
from fused_moonvit.moonvit.attention import AttentionChoice, backend_available, packed_attention

CONFIGS = [dict(block_m=128, block_n=128, stages=2, overlap=True, groups=1, pingpong=False, p_shared=False),
           dict(block_m=128, block_n=128, stages=2, overlap=True, groups=2, pingpong=False, p_shared=False),
           dict(block_m=128, block_n=64, stages=3, overlap=True, groups=2, pingpong=False, p_shared=False),
           dict(block_m=128, block_n=128, stages=2, overlap=False, groups=2, pingpong=False, p_shared=False),
           dict(block_m=128, block_n=128, stages=2, overlap=False, groups=1, pingpong=False, p_shared=False),
           dict(block_m=64, block_n=128, stages=2, overlap=True, groups=1, pingpong=False, p_shared=False),
           dict(block_m=128, block_n=128, stages=3, overlap=True, groups=2, pingpong=False, p_shared=False),
           dict(block_m=128, block_n=128, stages=2, overlap=True, groups=2, pingpong=True, p_shared=False),
           dict(block_m=128, block_n=128, stages=3, overlap=True, groups=2, pingpong=True, p_shared=False),
           dict(block_m=128, block_n=64, stages=4, overlap=True, groups=2, pingpong=True, p_shared=False),
           dict(block_m=256, block_n=64, stages=3, overlap=True, groups=2, pingpong=True, p_shared=False),
           dict(block_m=256, block_n=64, stages=4, overlap=True, groups=2, pingpong=True, p_shared=False),
           dict(block_m=256, block_n=64, stages=3, overlap=True, groups=2, pingpong=False, p_shared=False),
           dict(block_m=256, block_n=64, stages=2, overlap=True, groups=2, pingpong=True, p_shared=False),
           dict(block_m=256, block_n=32, stages=4, overlap=True, groups=2, pingpong=True, p_shared=False),
           dict(block_m=256, block_n=64, stages=3, overlap=True, groups=2, pingpong=True, p_shared=True),
           dict(block_m=128, block_n=128, stages=2, overlap=True, groups=2, pingpong=True, p_shared=True),
           dict(block_m=256, block_n=64, stages=4, overlap=True, groups=2, pingpong=True, p_shared=True),
           dict(block_m=192, block_n=128, stages=2, overlap=True, groups=3, pingpong=True, p_shared=True),
           dict(block_m=192, block_n=64, stages=3, overlap=True, groups=3, pingpong=True, p_shared=True),
           dict(block_m=192, block_n=128, stages=3, overlap=True, groups=3, pingpong=True, p_shared=True),
           dict(block_m=192, block_n=64, stages=4, overlap=True, groups=3, pingpong=True, p_shared=True),
           dict(block_m=192, block_n=64, stages=3, overlap=True, groups=3, pingpong=True, p_shared=False),
           dict(block_m=192, block_n=64, stages=4, overlap=True, groups=3, pingpong=True, p_shared=False)]


def plan_cu(items, budget, dev, slots=64):
    plan = build_plan(items, budget, slots)
    cu = plan_cu_seqlens(upload_plan(plan, new_device_plan(slots, dev), budget=budget))
    return cu, sum(t * h * w for t, h, w in items)


def check(cis):
    allrows = {ci: [] for ci in cis}
    for heads, hd in ((16, 72), (12, 128), (4, 64)):
        for items, budget in (([(1, 128, 128)], 16384), ([(1, 32, 32), (1, 2, 2), (4, 10, 12), (1, 64, 64), (1, 6, 18)], 8192),
                              ([(1, 30, 34)], 1024 + 64), ([(1, 16, 16)] * 5, 2048)):
            cu, valid = plan_cu(items, budget, dev)
            qkv = torch.randn(budget, 3 * heads * hd, generator=gen).to(dev, torch.bfloat16)
            qkv[valid:] = float("nan")
            ref = varlen_attention_reference(qkv, cu, heads, hd)
            fa3 = None
            if backend_available("fa3", dev) and hd != 64:
                o3 = packed_attention(qkv.clone(), cu, heads, hd, budget, AttentionChoice("fa3"))
                fa3 = rel_err(o3[:valid], ref[:valid])
            for ci in cis:
                cfg = GluonAttentionConfig(**CONFIGS[ci])
                if config_unsupported(cfg, hd):
                    continue
                out = torch.full((budget, heads * hd), float("nan"), dtype=torch.bfloat16, device=dev)
                t0 = time.time()
                try:
                    gluon_attention_fwd(qkv, cu, heads, hd, config=cfg, out=out)
                    torch.cuda.synchronize()
                except Exception as exc:
                    print(f"cfg{ci} hd{hd} failed: {exc!r}"[:400], flush=True); continue
                e = rel_err(out[:valid], ref[:valid])
                pad_ok = bool(out[valid:].eq(0).all())
                allrows[ci].append(dict(heads=heads, hd=hd, budget=budget, items=len(items), err=e, fa3_err=fa3,
                                        pad_zero=pad_ok, nan=bool(out[:valid].isnan().any()), s=round(time.time() - t0, 1)))
                print(f"cfg{ci} hd{hd} B{budget} n{len(items)}: err {e:.3e} fa3 {fa3} pad0 {pad_ok} nan {allrows[ci][-1]['nan']} {time.time()-t0:.1f}s", flush=True)
    iso = {}
    for ci in cis:
        cfg = GluonAttentionConfig(**CONFIGS[ci])
        heads, hd = 2, 72
        cu = torch.tensor([0, 6, 16, 16, 20, 24], dtype=torch.int32, device=dev)
        qkv = torch.randn(24, 3 * heads * hd, generator=gen).to(dev, torch.bfloat16)
        exact = gluon_attention_fwd(qkv.clone(), cu, heads, hd, config=cfg).clone()
        qkv[20:] = float("nan"); qkv[8, 2 * heads * hd + 3] = float("nan"); qkv[9, heads * hd + 5] = float("inf")
        o = gluon_attention_fwd(qkv, cu, heads, hd, config=cfg)
        iso[ci] = bool(torch.equal(o[:6], exact[:6]) and torch.equal(o[16:20], exact[16:20]) and o[20:].eq(0).all())
        print(f"cfg{ci} isolation {iso[ci]}", flush=True)
    json.dump(dict(results, configs=CONFIGS, rows=allrows, isolation=iso), open(f"{out_dir}/check.json", "w"), indent=1)

def timing(tag):
    rows = []
    cases = [("1x16384", [(1, 128, 128)], 16384), ("1x4096", [(1, 64, 64)], 4096), ("16x1024", [(1, 32, 32)] * 16, 16384),
             ("1x1024", [(1, 32, 32)], 1024)]
    for heads, hd in [(16, 72), (12, 128)][:int(os.environ.get("HEAD_DIMS", "2"))]:
        for name, items, budget in cases:
            cu, valid = plan_cu(items, budget, dev)
            qkv = torch.randn(budget, 3 * heads * hd, generator=gen).to(dev, torch.bfloat16)
            use = [int(c) for c in os.environ.get("CFGS", ",".join(map(str, range(len(CONFIGS))))).split(",")]
            cands = [(f"gluon{i}", AttentionChoice("gluon", GluonAttentionConfig(**CONFIGS[i]))) for i in use
                     if not config_unsupported(GluonAttentionConfig(**CONFIGS[i]), hd)]
            cands += [("fa3", AttentionChoice("fa3")), ("triton", AttentionChoice("triton", AttentionConfig(128, 64, 8, 3) if budget > 2048 else AttentionConfig(64, 64, 4, 3)))]
            flops = 4 * sum((t*h*w) ** 2 for t, h, w in items) * heads * hd
            # Rounds interleave the candidates, so a slow spell of the GPU (FA3's time is bimodal) hits all.
            times = {}
            for rnd in range(int(os.environ.get("REPEATS", "1"))):
                for cname, ch in cands:
                    if times.get(cname, 0) is None:
                        continue
                    try:
                        us = graph_time_us(lambda: packed_attention(qkv, cu, heads, hd, budget, ch), calls=5, rep_ms=100)
                    except Exception as exc:
                        print(cname, "failed", repr(exc)[:300], flush=True); times[cname] = None; continue
                    times.setdefault(cname, []).append(us)
                    rows.append(dict(case=name, hd=hd, cand=cname, us=us, tflops=flops / us / 1e6, round=rnd))
            line = [f"{c} {statistics.median(t):.0f}" for c, t in times.items() if t]
            print(f"{tag} hd{hd} {name} (median of rounds): " + "  ".join(line), flush=True)
    json.dump(dict(results, rows=rows, configs=CONFIGS), open(f"{out_dir}/time-{tag}.json", "w"), indent=1)


def main(argv):
    global dev, gen, out_dir, results
    if len(argv) != 2 or argv[0] not in ("check", "time"):
        raise SystemExit("usage: gluon_sweep check INDICES | gluon_sweep time TAG")
    import triton

    dev = torch.device("cuda")
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(int(time.time()) % 1000)
    results = {"mode": argv[0], "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__}
    if argv[0] == "check":
        check([int(c) for c in argv[1].split(",")])
    else:
        timing(argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
