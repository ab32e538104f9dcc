"""Measures every attention backend (and the Triton kernel's tile configurations) per budget and head dim,
and writes the table `choose_attention` reads.

    python -m fused_moonvit.benchmarks.tune_attention --out benchmarks/results

For each case (a budget and the items in it: the benchmark sets of docs/design.md section 4.2, exact and
padded, and the sizes Kimi-K2.5 users send, up to one 16384-patch photo or 4-frame video chunk), at 16
heads of 72 (Kimi-VL, Kimi-K2.5 / K2.6) and 12 heads of 128 (Kimi-K3), every candidate runs on the same
random bf16 qkv the way the encoder calls it: the plan's cu_seqlens with its padding sequence and 64 item
slots, max_seqlen = the budget, inside a CUDA graph of 5 back-to-back calls, median of do_bench (L2 flushed
before each replay, so the first call reads its inputs from memory and the next four as the previous
one left them), each candidate timed in `--rounds` interleaved rounds and ranked by its median.
Candidates: the Triton kernel per tile configuration, vLLM's FlashAttention-3 (where it loads), PyTorch's
FlashAttention-2 and the Gluon kernel per tile configuration (on Hopper). TFLOP/s count head-dim-wide products (72, not FA3's 96). Each output is checked against an fp64 reference (SDPA per sequence) and its padding
rows against zeros; a candidate that fails either is not ranked.

Writes DIR/attention_tuning-hd72-hd128.json (every candidate's time and error per case) and the table
(`--table`, by default moonvit/attention_table.json in the source tree): per (device class, head dim,
budget) the candidates ranked by their total time over that budget's cases. `--cases` re-measures some
budgets (all cases of each) and keeps the table's other rows. CUDA only.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import sys

import torch

from fused_moonvit.benchmarks.common import graph_time_us
from fused_moonvit.benchmarks.flops import attention_flops
from fused_moonvit.benchmarks.image_sets import IMAGE_SETS, USER_IMAGE_SETS, USER_VIDEO_SETS, patches
from fused_moonvit.moonvit.arguments import OneLineParser, output_dir, positive_int
from fused_moonvit.moonvit.attention import (BACKENDS, TABLE_PATH, AttentionChoice, backend_available,
                                             device_class, packed_attention)

MIX8 = IMAGE_SETS["mix8"]
CASES = {
    # name: (budget in patches, items as (h, w) or (t, h, w))
    "1x256": (256, IMAGE_SETS["1x224"]),
    "1x1024": (1024, IMAGE_SETS["1x448"]),
    "1x1024-in-2048": (2048, IMAGE_SETS["1x448"]),
    "4x1024": (4096, IMAGE_SETS["4x448"]),
    "1x4096": (4096, IMAGE_SETS["1x896"]),
    "2x4096": (8192, IMAGE_SETS["2x896"]),
    "1x4096-in-8192": (8192, IMAGE_SETS["1x896"]),
    "mix8": (10368, MIX8),
    "mix8-in-11264": (11264, MIX8),
    "16x1024": (16384, IMAGE_SETS["16x448"]),
    "mix8-in-16384": (16384, MIX8),
    "2x8192": (16384, USER_IMAGE_SETS["2photos8k"]),
    "1x16384": (16384, USER_IMAGE_SETS["photo16k"]),
    "2x16384": (32768, USER_VIDEO_SETS["2chunks16k"]),
}
HEADS = {72: 16, 128: 12}  # head dim -> heads: Kimi-VL / K2.5 / K2.6, and Kimi-K3

# (block_m, block_n, num_warps, num_stages); Triton 3.6's warp specialisation of the key loop measured no
# faster on an H100 (docs/design.md section 13)
TRITON_CONFIGS = [
    (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2),
    (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 2),
]
# The Gluon kernel's tiles (GluonAttentionConfig fields), where it runs (Hopper, Triton with Gluon).
GLUON_CONFIGS = [
    dict(block_m=128, block_n=128, stages=2, overlap=False, groups=2, pingpong=False, p_shared=False),
    dict(block_m=128, block_n=128, stages=3, overlap=True, groups=2, pingpong=False, p_shared=False),
    dict(block_m=128, block_n=128, stages=2, overlap=True, groups=2, pingpong=True, p_shared=False),
    dict(block_m=128, block_n=128, stages=3, overlap=True, groups=2, pingpong=True, p_shared=False),
    dict(block_m=128, block_n=128, stages=2, overlap=True, groups=2, pingpong=True, p_shared=True),
    dict(block_m=256, block_n=64, stages=3, overlap=True, groups=2, pingpong=True, p_shared=True),
    dict(block_m=256, block_n=64, stages=4, overlap=True, groups=2, pingpong=True, p_shared=True),
    dict(block_m=192, block_n=128, stages=2, overlap=True, groups=3, pingpong=True, p_shared=True),
    dict(block_m=192, block_n=64, stages=3, overlap=True, groups=3, pingpong=True, p_shared=True),
    dict(block_m=192, block_n=64, stages=3, overlap=True, groups=3, pingpong=True, p_shared=False),
]
GLUON_FIELDS = ("block_m", "block_n", "stages", "overlap", "groups", "pingpong", "p_shared")
LIBRARIES = ("fa3", "fa2")
CALLS = 5
SLOTS = 64
MAX_REL_ERR = 1e-2  # bf16: every backend lands near 2e-3 (P rounded to bf16 before the second product)


def candidates(device, head_dim, backends=BACKENDS):
    """(name, AttentionChoice) for every Triton configuration, every Gluon configuration and every library
    of `backends` that runs here."""
    from fused_moonvit.kernels.attention import AttentionConfig

    out = [(f"triton:{bm}x{bn}/w{w}/s{s}", AttentionChoice("triton", AttentionConfig(bm, bn, w, s)))
           for bm, bn, w, s in TRITON_CONFIGS if "triton" in backends]
    if "gluon" in backends and backend_available("gluon", device, head_dim):
        from fused_moonvit.kernels.attention_gluon import GluonAttentionConfig, config_unsupported

        for c in GLUON_CONFIGS:
            if config_unsupported(GluonAttentionConfig(**c), head_dim):
                continue
            name = (f"gluon:{c['block_m']}x{c['block_n']}/s{c['stages']}/g{c['groups']}" + ("/o" if c["overlap"] else "")
                    + ("/p" if c.get("pingpong") else "") + ("/ps" if c.get("p_shared") else ""))
            out.append((name, AttentionChoice("gluon", GluonAttentionConfig(**c))))
    out += [(lib, AttentionChoice(lib)) for lib in LIBRARIES if lib in backends and backend_available(lib, device)]
    return out


def ranking_table(results: dict, cls: str) -> list[dict]:
    """Per (head dim, budget): the candidates that passed in every case of that budget, fastest total first."""
    rows = []
    for head_dim, cases in results.items():
        budgets = sorted({c["budget"] for c in cases.values()})
        for budget in budgets:
            of_budget = [c for c in cases.values() if c["budget"] == budget]
            names = set.intersection(*({n for n, r in c["candidates"].items() if r.get("ok")} for c in of_budget))
            total = {n: sum(c["candidates"][n]["us"] for c in of_budget) for n in names}
            ranking = []
            for name in sorted(names, key=total.get):
                entry = of_budget[0]["candidates"][name]
                ranking.append({"backend": entry["backend"], **({"config": entry["config"]} if "config" in entry
                                                                else {}), "total_us": round(total[name], 1)})
            rows.append({"device_class": cls, "head_dim": head_dim, "max_budget": budget,
                         "cases": [c["name"] for c in of_budget], "ranking": ranking})
    return rows


def merge_table(table: dict, new_rows: list[dict], measured: dict) -> dict:
    """Puts one run's rows (all of one device class) into `table` in place: rows of other device classes,
    head dims and budgets stay as they were measured, and the run that measured them is kept beside this
    one's (as its "other_rows"). Each new row carries the run's date."""
    cls = measured["device_class"]
    replaced = {(r["device_class"], r["head_dim"], r["max_budget"]) for r in new_rows}
    kept = [r for r in table["rows"] if (r["device_class"], r["head_dim"], r["max_budget"]) not in replaced]
    earlier = table["measured"].get(cls)
    if earlier is not None and any(r["device_class"] == cls for r in kept):
        measured = {**measured, "other_rows": earlier}
    table["rows"] = sorted(kept + [{**r, "date": measured["date"]} for r in new_rows],
                           key=lambda r: (r["device_class"], r["head_dim"], r["max_budget"]))
    table["measured"][cls] = measured
    return table


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m fused_moonvit.benchmarks.tune_attention",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_dir, default="benchmarks/results",
                        help="directory for attention_tuning-hdD.json (default: %(default)s)")
    parser.add_argument("--table", default=str(TABLE_PATH),
                        help="where to write the backend table (default: %(default)s)")
    parser.add_argument("--cases", help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--head-dims", default="72,128", help="comma-separated subset of 72,128 (default: both)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="timings of each candidate, interleaved, whose median ranks it (default: %(default)s)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated backends to rank (default: %(default)s); the rows written rank only these")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    # A budget's row ranks the candidates over all of that budget's cases, so a run measures all or none.
    partial = sorted(n for n in CASES if n not in names and CASES[n][0] in {CASES[m][0] for m in names})
    if partial:
        parser.error(f"--cases leaves out {partial}, which share a budget with the cases given; add them")
    head_dims = [int(d) for d in args.head_dims.split(",") if d.strip().isdigit()]
    if not head_dims or len(head_dims) != len(args.head_dims.split(",")) or any(d not in HEADS for d in head_dims):
        parser.error(f"--head-dims: choose from {list(HEADS)}, got {args.head_dims}")
    backends = args.backends.split(",")
    if not set(backends) <= set(BACKENDS) or not backends:
        parser.error(f"--backends: choose from {', '.join(BACKENDS)}, got {args.backends}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")

    import triton

    from fused_moonvit.kernels import build_plan, new_device_plan, plan_cu_seqlens, upload_plan
    from fused_moonvit.kernels.attention import varlen_attention_reference

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    results: dict[int, dict] = {}
    for head_dim in head_dims:
        heads = HEADS[head_dim]
        results[head_dim] = {}
        for name in names:
            budget, items = CASES[name]
            plan = build_plan(items, budget, SLOTS)
            cu = plan_cu_seqlens(upload_plan(plan, new_device_plan(SLOTS, device), budget=budget))
            valid = patches(items)
            qkv = torch.randn(budget, 3 * heads * head_dim, generator=gen).to(device, torch.bfloat16)
            exact = varlen_attention_reference(qkv, cu, heads, head_dim)[:valid].float()
            flops = attention_flops(items, heads * head_dim)
            case = {"name": name, "budget": budget, "items": [list(i) for i in items], "valid_rows": valid,
                    "heads": heads, "head_dim": head_dim, "candidates": {}}
            timed = []
            for cand, choice in candidates(device, head_dim, backends):
                entry = {"backend": choice.backend}
                c = choice.config
                if choice.backend == "triton":
                    entry["config"] = [c.block_m, c.block_n, c.num_warps, c.num_stages]
                elif choice.backend == "gluon":
                    entry["config"] = {f: getattr(c, f) for f in GLUON_FIELDS}
                case["candidates"][cand] = entry
                try:
                    out = packed_attention(qkv, cu, heads, head_dim, budget, choice)
                    torch.cuda.synchronize()
                except Exception as exc:  # a configuration that does not compile, or a library that refuses
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(f"  {name} hd{head_dim} {cand}: {entry['error']}", flush=True)
                    continue
                err = ((out[:valid].float() - exact).norm() / exact.norm()).item()
                pad_zero = bool(out[valid:].eq(0).all())
                entry.update(rel_err=err, padding_zero=pad_zero, ok=err <= MAX_REL_ERR and pad_zero, us_rounds=[])
                timed.append((cand, choice))
            # Rounds interleave the candidates, so a slow spell of the GPU (FA3's own time moves by 10-20%
            # between runs) does not rank one candidate by its slow round and another by its fast one.
            for _ in range(args.rounds):
                for cand, choice in timed:
                    case["candidates"][cand]["us_rounds"].append(graph_time_us(
                        lambda: packed_attention(qkv, cu, heads, head_dim, budget, choice), calls=CALLS, rep_ms=120))
            for cand, _ in timed:
                entry = case["candidates"][cand]
                entry["us"] = statistics.median(entry["us_rounds"])
                entry["tflops"] = flops / entry["us"] / 1e6
            ranked = sorted((n for n, r in case["candidates"].items() if r.get("ok")),
                            key=lambda n: case["candidates"][n]["us"])
            if not ranked:
                print(f"error: {name} hd{head_dim}: no candidate ran and matched the reference", file=sys.stderr)
                return 1
            # The fastest configuration of each kernel, and every library.
            best = {k: next((n for n in ranked if n.startswith(k)), None) for k in ("triton", "gluon")}
            line = "  ".join(f"{n} {case['candidates'][n]['us']:.0f}" for n in ranked
                             if n.split(":")[0] not in best or n in best.values())
            print(f"hd{head_dim} {name:16s} B={budget:6d}  {line}", flush=True)
            results[head_dim][name] = case
            del qkv, exact
            torch.cuda.empty_cache()

    cls = device_class(device)
    measured = {"device": torch.cuda.get_device_name(), "device_class": cls, "torch": torch.__version__,
                "triton": triton.__version__, "cuda": torch.version.cuda,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": shlex.join(["python", "-m", "fused_moonvit.benchmarks.tune_attention", *argv])}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention_tuning-" + "-".join(f"hd{d}" for d in head_dims) + ".json")
    with open(path, "w") as f:
        json.dump({**measured, "slots": SLOTS, "calls_per_graph": CALLS, "max_rel_err": MAX_REL_ERR,
                   "results": results}, f, indent=1)
    table = {"measured": {}, "rows": []}
    if os.path.isfile(args.table):
        with open(args.table) as f:
            table = json.load(f)
    merge_table(table, ranking_table(results, cls), measured)
    with open(args.table, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {path} and {args.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
