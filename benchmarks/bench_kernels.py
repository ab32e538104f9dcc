"""Each fused kernel against its baseline (vLLM's PyTorch way, FlashAttention-2, PyTorch, cuBLAS), in the
same run.

    fused-moonvit bench kernels                      (writes benchmarks/results/kernels.json and kernels.png)
    fused-moonvit bench kernels --smoke              (CPU check; writes into a new temporary directory)

Rows, for every image set of docs/design.md section 4.2 (bf16, hidden 1152, 16 heads x 72, the 64x64 table):
  pos_embed  ours: interp_pos_embed                vLLM: per-image F.interpolate of the table, cat, x + pe
  rope       ours: apply_rope_2d (one layer)       vLLM 0.34's MoonViT3d: q and k rotated in place by its
                                                   packed-QKV Triton kernel (benchmarks/vllm_rope.py) from
                                                   the per-call freqs_cis
  merge      ours: merge_patches                   vLLM: per-image view/permute (patch_merger), cat, pre_norm
  plan       ours: build_plan on the host (median wall time) and expand_plan on the device
  attention  ours: the Triton kernel, tiles as chosen for the budget
  attention_chosen  ours: the backend the encoder chooses for the budget (moonvit/attention.py)
                                                   vLLM's attention as vLLM calls it (the plan's cu_seqlens,
                                                   max_seqlen = B): its own FlashAttention-3 on Hopper,
                                                   else FlashAttention-2 varlen (torch)
  add_norm   ours: add_layer_norm (residual + wo's bias, then the norm)
                                                   PyTorch: x + y, F.layer_norm
  qkv, wo, fc0_gelu, fc1: the layer's GEMMs as the fused forward calls them (fc0 with bias and tanh GELU in
             cuBLASLt's epilogue, wo without its bias) against the unfused F.linear (+ F.gelu)
  patch_gemm_aligned: the patch GEMM on rows padded to 592 against the contiguous K = 588
plus RoPE on single images of 256 and 4096 tokens and the merge on one of 16384 tokens. Attention, add +
norm and the GEMMs read what the previous kernel just wrote, so their "_warm_us" is the realistic figure
(attention also gets the cold one).

Every step is captured in a CUDA graph first, so the times are device time without launch cost (the
launchers' Python checks and Triton's argument handling add tens of µs per eager call; inside the
captured forward they cost nothing). "_us": median of `triton.testing.do_bench` over replays of one call,
with a 256 MB buffer zeroed before each, so inputs start evicted from the 50 MB L2 (as rotating buffers
larger than L2 would): the pessimistic figure, against which the issue's targets are read. "_warm_us":
per call of ten calls replayed back to back, as the steps run inside the captured forward, with L2 as
the previous call left it. The GPU is kept busy for a second first, so the clocks are up for the first
row.

--smoke runs on the CPU under the Triton interpreter with tiny sizes and calls each function once: it
checks the script (JSON and plot included), not the speed, and writes into a new temporary directory
unless --out names another (never benchmarks/results).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fused_moonvit.benchmarks.common import graph_time_us
from fused_moonvit.benchmarks.outdir import add_out_argument, check_out, out_dir
from fused_moonvit.moonvit.arguments import OneLineParser, positive_int

FULL = dict(hidden=1152, heads=16, head_dim=72, mlp=4304, table=64, dtype=torch.bfloat16)
SMOKE = dict(hidden=16, heads=2, head_dim=8, mlp=24, table=8, dtype=torch.float32)
SMOKE_SETS = {"tiny2": [(4, 4), (2, 6)], "one": [(6, 2)]}
EXTRA_ROPE = {"rope256": [(16, 16)], "rope4096": [(64, 64)]}
EXTRA_MERGE = {"merge16384": [(128, 128)]}
KERNELS = ("plan", "pos_embed", "rope", "merge", "attention", "add_norm", "gemm")


# --- vLLM 0.33's way, per step (model_executor/models/moonvit.py and kimi_vl.py, rewritten) ----------

def vllm_pos_embed(x, table, grids):
    pes = []
    for h, w in grids:
        if (h, w) == tuple(table.shape[:2]):
            pes.append(table.flatten(end_dim=1))
        else:
            pe = F.interpolate(table.permute(2, 0, 1).unsqueeze(0), size=(h, w), mode="bicubic")
            pes.append(pe.squeeze(0).permute(1, 2, 0).flatten(end_dim=1))
    return x + torch.cat(pes)


def vllm_merge_prenorm(x, grids, weight, bias):
    parts, start = [], 0
    for h, w in grids:
        seq = x[start : start + h * w].view(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4).contiguous()
        parts.append(seq.view((h // 2) * (w // 2), 4, -1))
        start += h * w
    merged = torch.cat(parts)
    return F.layer_norm(merged, (x.shape[1],), weight, bias, 1e-5).view(merged.shape[0], -1)


# --- measuring --------------------------------------------------------------------------------------

def relerr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm())


class Timer:
    """Device time of a step (`graph_time_us`: in a CUDA graph, so no launch cost is counted). On the CPU
    (--smoke), the wall time of one interpreted call: meaningless, but it runs the whole script, plot
    included."""

    def __init__(self, cuda: bool, rep_ms: int):
        self.cuda = cuda
        self.rep_ms = rep_ms

    def cold(self, fn):
        """Median and 20th/80th percentiles in µs of one call, L2 flushed before each."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            t = (time.perf_counter() - t0) * 1e6
            return t, t, t
        return tuple(graph_time_us(fn, rep_ms=self.rep_ms, quantiles=(0.5, 0.2, 0.8)))

    def warm(self, fn, calls=10):
        """µs per call of `calls` back-to-back calls in one graph: as inside the captured forward, with L2
        as the previous call left it."""
        if not self.cuda:
            return self.cold(fn)[0]
        return graph_time_us(fn, calls=calls, flush_l2=False)


def row(kernel, case, tokens, timer, ours, baseline, nbytes, err, copy_tbps, *, baseline_name="vLLM 0.33's way",
        flops=None, warm_only=False):
    """One measured step. `ours` and `baseline` run on the same inputs; err is ours against the baseline
    (or an exact reference). With warm_only, the cold (L2-flushed) figure is skipped: for steps whose
    inputs the previous kernel just wrote (attention, add + norm, GEMMs), warm is the realistic one."""
    r = dict(kernel=kernel, case=case, tokens=tokens, bytes=nbytes, baseline=baseline_name, rel_err_vs_baseline=err)
    if not warm_only:
        t_ours, lo, hi = timer.cold(ours)
        t_base = timer.cold(baseline)[0] if baseline is not None else None
        r.update(ours_us=t_ours, ours_p20_us=lo, ours_p80_us=hi, baseline_us=t_base)
        r["ours_tbps"] = nbytes / (t_ours * 1e-6) / 1e12
        r["copy_fraction"] = r["ours_tbps"] / copy_tbps
        if t_base:
            r["speedup"] = t_base / t_ours
    r["ours_warm_us"] = timer.warm(ours)
    # Baselines that take milliseconds are left out of the warm timing: ten of them per replay would
    # take seconds and change no conclusion.
    slow = r.get("baseline_us") is not None and r["baseline_us"] >= 2000
    r["baseline_warm_us"] = timer.warm(baseline) if baseline is not None and not slow else None
    if r["ours_warm_us"] and r["baseline_warm_us"]:
        r["speedup_warm"] = r["baseline_warm_us"] / r["ours_warm_us"]
    if flops is not None:
        r["flops"] = flops
        t = r["ours_warm_us"] if warm_only or not timer.cuda else r["ours_us"]
        if t:
            r["ours_tflops"] = flops / (t * 1e-6) / 1e12
        tb = r["baseline_warm_us"] if warm_only or not timer.cuda else r.get("baseline_us")
        if tb:
            r["baseline_tflops"] = flops / (tb * 1e-6) / 1e12
    return r


def bench_set(name, grids, cfg, device, timer, copy_tbps, gen, kernels):
    from fused_moonvit.kernels import (apply_rope_2d, build_plan, expand_plan, interp_pos_embed, merge_patches,
                                       new_device_plan, new_token_meta, rope_cos_sin_table, upload_plan)
    from fused_moonvit.moonvit.modules import rope_frequencies

    dt, c, heads, hd = cfg["dtype"], cfg["hidden"], cfg["heads"], cfg["head_dim"]
    es = torch.finfo(dt).bits // 8
    tokens = sum(h * w for h, w in grids)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    plan = build_plan(grids, tokens, len(grids))
    device_plan = upload_plan(plan, new_device_plan(len(grids), device))
    meta = expand_plan(device_plan, new_token_meta(tokens, device))
    rows = []

    if "plan" in kernels:
        host = []
        for _ in range(200 if timer.cuda else 1):
            t0 = time.perf_counter()
            build_plan(grids, tokens, len(grids))
            host.append((time.perf_counter() - t0) * 1e6)
        r = row("plan", name, tokens, timer, lambda: expand_plan(device_plan, meta), None, 7 * 4 * tokens, None,
                copy_tbps)
        r["build_plan_host_us"] = statistics.median(host)
        rows.append(r)

    if "pos_embed" in kernels:
        table, x = rand(cfg["table"], cfg["table"], c), rand(tokens, c)
        out = torch.empty_like(x)
        ours = lambda: interp_pos_embed(x, table, meta, out=out)  # noqa: E731
        base = lambda: vllm_pos_embed(x, table, grids)  # noqa: E731
        err = relerr(ours(), base())
        nbytes = (2 * tokens + table.shape[0] * table.shape[1]) * c * es
        rows.append(row("pos_embed", name, tokens, timer, ours, base, nbytes, err, copy_tbps))

    if "rope" in kernels:
        from fused_moonvit.benchmarks.hostmeta import call_freqs_cis, rope_table
        from fused_moonvit.benchmarks.vllm_rope import packed_qk_rope_

        theta = 10000.0
        cos_sin = rope_cos_sin_table(rope_frequencies(hd, theta).to(device))
        freqs_cis = call_freqs_cis(rope_table(hd, theta, device=device), [(1, h, w) for h, w in grids])
        qkv = rand(tokens, 3 * heads * hd)
        base_qkv = qkv.clone().view(tokens, 3, heads, hd)
        want = packed_qk_rope_(base_qkv.clone(), freqs_cis).flatten(1)
        rotated = apply_rope_2d(qkv.clone(), meta, cos_sin, heads, hd)
        err = relerr(rotated[:, : 2 * heads * hd], want[:, : 2 * heads * hd])
        # In place, both: repeated calls keep rotating the same buffer, which leaves its norms unchanged.
        ours = lambda: apply_rope_2d(qkv, meta, cos_sin, heads, hd)  # noqa: E731
        base = lambda: packed_qk_rope_(base_qkv, freqs_cis)  # noqa: E731
        rows.append(row("rope", name, tokens, timer, ours, base, 2 * tokens * 2 * heads * hd * es, err, copy_tbps,
                        baseline_name="vLLM 0.34's packed q/k RoPE kernel"))

    if "merge" in kernels:
        x, weight, bias = rand(tokens, c), rand(c), rand(c)
        out = torch.empty(tokens // 4, 4 * c, device=device, dtype=dt)
        ours = lambda: merge_patches(x, meta, weight, bias, out=out)  # noqa: E731
        base = lambda: vllm_merge_prenorm(x, grids, weight, bias)  # noqa: E731
        err = relerr(ours(), base())
        rows.append(row("merge", name, tokens, timer, ours, base, 2 * tokens * c * es, err, copy_tbps))

    if "attention" in kernels:
        rows += bench_attention(name, grids, tokens, cfg, device, timer, copy_tbps, rand, device_plan)
    if "add_norm" in kernels:
        rows.append(bench_add_norm(name, tokens, cfg, timer, copy_tbps, rand))
    if "gemm" in kernels:
        rows += bench_gemms(name, tokens, cfg, timer, copy_tbps, rand)
    return rows


def bench_attention(name, grids, tokens, cfg, device, timer, copy_tbps, rand, device_plan):
    """Two rows on the same qkv and plan: our Triton kernel (the tiles `choose_attention` picks for this
    budget), and the encoder's chosen backend, each against the attention vLLM runs here, called as vLLM
    calls it (the plan's cu_seqlens, padding sequence included, max_seqlen = B): its own FlashAttention-3
    on Hopper, else FlashAttention-2. The other backends' warm times ride along in each row."""
    from fused_moonvit.benchmarks.flops import attention_flops
    from fused_moonvit.benchmarks.hostmeta import vllm_attention
    from fused_moonvit.kernels import plan_cu_seqlens
    from fused_moonvit.kernels.attention import varlen_attention_reference
    from fused_moonvit.moonvit.attention import BACKENDS, backend_available, choose_attention, packed_attention

    heads, hd = cfg["heads"], cfg["head_dim"]
    qkv = rand(tokens, 3 * heads * hd)
    cu = plan_cu_seqlens(device_plan)
    q, k, v = qkv.view(tokens, 3, heads, hd).unbind(1)
    vllm = "fa3" if backend_available("fa3", device) else "fa2"
    base = (lambda: vllm_attention(vllm, q, k, v, cu, tokens)) if timer.cuda else None  # noqa: E731
    exact = varlen_attention_reference(qkv.float(), cu, heads, hd)
    flops = attention_flops(grids, heads * hd)
    nbytes = 4 * tokens * heads * hd * qkv.element_size()
    baseline_err = relerr(base().reshape(tokens, -1), exact) if base is not None else None
    others = {b: timer.warm(lambda b=b: packed_attention(qkv, cu, heads, hd, tokens, choose_attention(tokens, device, hd, b)))
              for b in BACKENDS if timer.cuda and backend_available(b, device)}
    rows = []
    for kernel, backend in (("attention", "triton"), ("attention_chosen", None)):
        choice = choose_attention(tokens, device, hd, backend)
        ours = lambda: packed_attention(qkv, cu, heads, hd, tokens, choice)  # noqa: E731
        err = relerr(ours(), exact)
        r = row(kernel, name, tokens, timer, ours, base, nbytes, err, copy_tbps, flops=flops,
                baseline_name=f"vLLM's attention: {'its FlashAttention-3' if vllm == 'fa3' else 'FlashAttention-2'}")
        r.update(rel_err_vs_fp32=err, baseline_rel_err_vs_fp32=baseline_err, backend=choice.backend,
                 config=str(choice.config), backends_warm_us=others)
        rows.append(r)
    return rows


def bench_add_norm(name, tokens, cfg, timer, copy_tbps, rand):
    """Residual add + LayerNorm in one kernel against PyTorch's residual add then F.layer_norm. The
    baseline's projection output already holds its bias (the GEMM's epilogue added it); ours gets the
    projection without its bias and adds it."""
    from fused_moonvit.kernels.layernorm import add_layer_norm

    c = cfg["hidden"]
    x, y, bias, weight, ln_bias = rand(tokens, c), rand(tokens, c), rand(c), rand(c), rand(c)
    out = torch.empty_like(x)
    y_biased = y + bias
    ours = lambda: add_layer_norm(x, y, weight, ln_bias, 1e-5, bias=bias, out=out)  # noqa: E731
    base = lambda: F.layer_norm(x + y_biased, (c,), weight, ln_bias, 1e-5)  # noqa: E731

    x0 = x.clone()
    got = ours()
    x.copy_(x0)
    err = relerr(got, base())
    # In place, repeated calls keep adding y to x: harmless for timing (the values stay finite).
    return row("add_norm", name, tokens, timer, ours, base, 4 * tokens * c * x.element_size(), err, copy_tbps,
               baseline_name="PyTorch add + F.layer_norm", warm_only=True)


def bench_gemms(name, tokens, cfg, timer, copy_tbps, rand):
    """The layer's four GEMMs as the fused forward runs them (cuBLAS through F.linear; fc0 with its bias and
    tanh-GELU in cuBLASLt's epilogue, wo without its bias) against the unfused PyTorch calls."""
    c, inter = cfg["hidden"], cfg["mlp"]
    rows = []
    x, xi = rand(tokens, c), rand(tokens, inter)
    shapes = {"qkv": (x, 3 * c), "wo": (x, c), "fc0_gelu": (x, inter), "fc1": (xi, c)}
    for gemm, (inp, n) in shapes.items():
        w, b = rand(n, inp.shape[1]) / inp.shape[1] ** 0.5, rand(n)
        flops = 2 * tokens * inp.shape[1] * n
        if gemm == "fc0_gelu":
            if timer.cuda:
                ours = lambda: torch._addmm_activation(b, inp, w.t(), use_gelu=True)  # noqa: E731
            else:  # the CPU's use_gelu is the erf GELU: the smoke run checks the script, not the epilogue
                ours = lambda: F.gelu(F.linear(inp, w, b), approximate="tanh")  # noqa: E731
            base = lambda: F.gelu(F.linear(inp, w, b), approximate="tanh")  # noqa: E731
            pre = F.linear(inp.double(), w.double(), b.double())
            exact = F.gelu(pre, approximate="tanh")
            err = relerr(ours(), exact)
            r = row(gemm, name, tokens, timer, ours, base, (inp.numel() + w.numel() + tokens * n) * inp.element_size(),
                    err, copy_tbps, baseline_name="F.linear + F.gelu(tanh)", flops=flops, warm_only=True)
            r["baseline_rel_err_vs_fp64"] = relerr(base(), exact)
            r["rel_err_vs_erf_gelu"] = relerr(ours(), F.gelu(pre))
        else:
            # wo runs without its bias (the add + norm kernel adds it); qkv and fc1 as PyTorch runs them.
            ours = (lambda: F.linear(inp, w)) if gemm == "wo" else (lambda: F.linear(inp, w, b))  # noqa: E731
            base = lambda: F.linear(inp, w, b)  # noqa: E731
            r = row(gemm, name, tokens, timer, ours, base, (inp.numel() + w.numel() + tokens * n) * inp.element_size(),
                    None, copy_tbps, baseline_name="F.linear with bias", flops=flops, warm_only=True)
        rows.append(r)
    # The patch embedding: K = 3 * 14 * 14 = 588 is not a multiple of 8, so rows of a contiguous (B, 588)
    # matrix are not 16-byte aligned; the same GEMM on views of (B, 592) buffers has aligned rows.
    k, kp = 588, 592
    pix, wp = rand(tokens, kp), rand(c, kp)
    pix_c, wp_c = pix[:, :k].contiguous(), wp[:, :k].contiguous()
    ours = lambda: F.linear(pix[:, :k], wp[:, :k])  # noqa: E731
    base = lambda: F.linear(pix_c, wp_c)  # noqa: E731
    rows.append(row("patch_gemm_aligned", name, tokens, timer, ours, base, (tokens * k + c * k + tokens * c) * 2,
                    relerr(ours(), base()), copy_tbps, baseline_name="F.linear on contiguous K=588",
                    flops=2 * tokens * k * c, warm_only=True))
    return rows


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no plot (pip install -e ".[bench]" in the fused-moonvit checkout)',
              file=sys.stderr)
        return None
    kernels = [k for k in ("pos_embed", "rope", "merge", "attention", "add_norm", "fc0_gelu")
               if any(r["kernel"] == k for r in results)]
    cols = 3
    rows_n = -(-len(kernels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(17, 4.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(kernels):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, kernels):
        rs = [r for r in results if r["kernel"] == k]
        # Cold (L2 flushed) where measured, else back to back (inputs as the previous kernel left them).
        key = "ours_us" if rs and rs[0].get("ours_us") is not None else "ours_warm_us"
        base_key = "baseline_us" if key == "ours_us" else "baseline_warm_us"
        xs = range(len(rs))
        ax.bar([i - 0.2 for i in xs], [r[base_key] or 0 for r in rs], 0.4, label=rs[0]["baseline"])
        ax.bar([i + 0.2 for i in xs], [r[key] or 0 for r in rs], 0.4, label="fused-moonvit")
        for i, r in zip(xs, rs):
            if r[key] and r[base_key]:
                ax.annotate(f"{r[base_key] / r[key]:.2g}x", (i + 0.2, r[key]), ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [f"{r['case']}\n{r['tokens']}" for r in rs], fontsize=7)
        ax.set_title(f"{k} ({'cold L2' if key == 'ours_us' else 'back to back'})")
        ax.set_ylabel("µs (median)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = OneLineParser(prog="fused-moonvit bench kernels", description=__doc__.split("\n\n")[0])
    add_out_argument(parser, "kernels.json and kernels.png")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes, one call each")
    parser.add_argument("--sets", help="comma-separated image sets (default: all of docs/design.md section 4.2)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--rep-ms", type=positive_int, default=500, help="do_bench's timed budget per measurement")
    parser.add_argument("--copy-tbps", type=float, default=4.2, help="copy ceiling (docs/design.md section 4.3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_out(args, parser)

    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        parser.error("needs a CUDA device; --smoke checks the script on the CPU")
    if not cuda:
        # Triton chooses the interpreter when the kernels are decorated, i.e. at their first import below.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    from fused_moonvit.benchmarks.hostmeta import baseline_rope
    from fused_moonvit.benchmarks.image_sets import IMAGE_SETS, USER_IMAGE_SETS

    cfg = SMOKE if args.smoke else FULL
    all_sets = SMOKE_SETS if args.smoke else {**IMAGE_SETS, **USER_IMAGE_SETS}
    names = args.sets.split(",") if args.sets else list(all_sets)
    unknown = [n for n in names if n not in all_sets]
    if unknown:
        parser.error(f"unknown image set(s) {unknown}; choose from {list(all_sets)}")
    kernels = set(args.kernels.split(","))
    if kernels - set(KERNELS):
        parser.error(f"unknown kernel(s) {sorted(kernels - set(KERNELS))}; choose from {list(KERNELS)}")
    device = torch.device("cuda" if cuda else "cpu")
    timer = Timer(cuda, args.rep_ms)
    gen = torch.Generator().manual_seed(args.seed)

    if cuda:
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            a @ a
        torch.cuda.synchronize()
    results = []
    for name in names:
        results += bench_set(name, all_sets[name], cfg, device, timer, args.copy_tbps, gen, kernels)
    if not args.smoke and not args.sets:
        for extra, ks in ((EXTRA_ROPE, {"rope"}), (EXTRA_MERGE, {"merge"})):
            for name, grids in extra.items():
                results += bench_set(name, grids, cfg, device, timer, args.copy_tbps, gen, ks & kernels)
    for r in results:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if v is not None))

    copy_measured = None
    if cuda:
        src = torch.empty(2**29, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        # Timed eagerly: a copy captured in a graph becomes a memcpy node run by the copy engine, which
        # is far slower than the copy kernel the SMs run.
        from triton.testing import do_bench

        copy_measured = 2 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3) / 1e12
    out = Path(out_dir(args)) / "kernels.json"
    meta = dict(
        device=torch.cuda.get_device_name() if cuda
        else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter",
        torch=torch.__version__, triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(["fused-moonvit", "bench", "kernels", *(sys.argv[1:] if argv is None else argv)]),
        smoke=args.smoke, dtype=str(cfg["dtype"]), hidden=cfg["hidden"], heads=cfg["heads"], head_dim=cfg["head_dim"],
        copy_ceiling_tbps=args.copy_tbps, copy_measured_tbps=copy_measured,
        baseline_rope=baseline_rope("moonvit3d"),
        timing="CUDA-graph replays: _us do_bench median, L2 zeroed before each call; _warm_us ten calls back to back"
        if cuda
        else "wall time of one interpreted call each: meaningless",
    )
    out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    png = plot(results, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    bad = [r for r in results if r["rel_err_vs_baseline"] is not None and not r["rel_err_vs_baseline"] < 2e-2]
    if bad:
        print(f"error: results disagree with their baselines: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
