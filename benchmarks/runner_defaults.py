"""What the graph runner's defaults cost against its best configuration, in one GPU run.

`python -m fused_moonvit.benchmarks.runner_defaults --out DIR` (CUDA; Kimi-K2.5's real-size tower and
projector by default, random bf16 weights) writes DIR/runner_defaults.json and prints a summary. Whole
calls are timed as `bench encoder` times them (CUDA events around `encode` on an idle GPU, host work
included, median of `--iters` after `--warmup`), the replay alone by the same events around the graph's
`replay()`. Parts:

1. configs: the sets 1x448 (1024 patches), 1x896 (4096), 1x66x64 (4224: just above a power of two) and
   16x448 (16384) through each runner configuration: "default" (`MoonVitGraphRunner(model)`:
   `default_budgets()`, 64 item slots), "ladder16" (that ladder, 16 slots), "exact16" (one graph of the
   set's budget, 16 slots: `bench encoder`'s fused graph row), "exact64" (one graph, 64 slots),
   "octave4" (`octave_budgets(4)`, the sparser octave ladder, 64 slots), and "default" again last (drift).
   Per configuration: capture time (kernels compiled beforehand), pool growth and graph count; per set:
   the whole call, its host time, the replay alone, the budgets replayed, the error against exact16.
2. inputs: the default runner fed the pixels as users have them: bf16 on the GPU (part 1), fp32 on the
   GPU (the README's `.cuda()` of `preprocess_images`), fp32 on the CPU, and fp32 on the CPU moved to the
   GPU by the caller before `encode`.
3. host: a call's host steps alone, per slot count: `check_inputs`, `plan_chunks`, `items_plan` (plan
   built and pinned), the upload's launch, and the plan built as before this change (a list through
   `torch.tensor`), in µs.
4. profiles: `torch.profiler` (CUDA activities) over `--profile-calls` calls of default, ladder16,
   exact16 and exact64 per set: device µs per call by kernel (the top ones), by category, launches per
   call, and the kernels whose time differs most between default and exact16.
5. padding: the cost of a budget larger than the set: one 16-slot graph per budget, such as the budgets
   vLLM budget lists give (in output tokens, 4 patches each: 1x896 is 1024 tokens, so 1024, 2048, 4096
   and 8192 tokens are 4096, 8192, 16384 and 32768 patches), and which budget each list picks per set.

`--smoke` runs every part on the CPU with a one-layer tiny config, one tiny set and a 256-patch ladder,
one call per row and no graphs or profiles, so that CI can run the script end to end; its figures mean nothing, and it
writes into a new temporary directory unless `--out` names another (never benchmarks/results).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import time
from collections import defaultdict

import torch

from fused_moonvit.benchmarks.common import SMOKE_CONFIG, add_run_arguments, measure, rel_err, versions
from fused_moonvit.benchmarks.image_sets import patches as set_patches
from fused_moonvit.benchmarks.image_sets import round_budget
from fused_moonvit.benchmarks.outdir import add_out_argument, out_dir, parse_benchmark_args
from fused_moonvit.moonvit.arguments import OneLineParser, positive_int
from fused_moonvit.moonvit.config import MoonVitConfig
from fused_moonvit.moonvit.families import FAMILIES

SETS = {"1x448": [(32, 32)], "1x896": [(64, 64)], "1x66x64": [(66, 64)], "16x448": [(32, 32)] * 16}
SMOKE_SETS = {"2x8x4": [(8, 4)] * 2}
TOP_BUDGET, SMOKE_TOP_BUDGET = 16384, 256

# name -> (ladder, item slots); a ladder of None is one graph of each set's own budget.
CONFIGS = {
    "default": ("default", 64),
    "ladder16": ("default", 16),
    "exact16": (None, 16),
    "exact64": (None, 64),
    "octave4": ("octave4", 64),
}
BASELINE = "exact16"
PROFILED = ("default", "ladder16", "exact16", "exact64")

# Part 5: set -> budgets larger than its own, in patches.
PADDING = {
    "1x448": [1024, 1280, 2048, 4096],
    "1x896": [4096, 4608, 5056, 8192, 16384, 32768],
    "1x66x64": [4608, 5056, 8192, 16384],
    "16x448": [16896],
}
SMOKE_PADDING = {"2x8x4": [128]}

# vLLM budget lists in output tokens: the README's two examples, and vLLM 0.34.0's default grid for Kimi
# models (its EncoderCudaGraphManager with the models' 64-token minimum and the 5120-token default cap:
# quarter-octave steps to 1024 tokens, steps of 128 to 2560, then eighth-octave steps rounded up to 128).
VLLM_TOKEN_LISTS = {
    "readme_kimi_k25": [256, 1024, 4096, 8192],
    "readme_kimi_vl": [256, 512, 1024, 2048, 4096, 8192],
    "vllm_034_default": [64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1152,
                         1280, 1408, 1536, 1664, 1792, 1920, 2048, 2176, 2304, 2432, 2560, 2816, 3072, 3456, 3840,
                         4224, 4608, 5120],
}


def ladders(top: int) -> dict[str, list[int]]:
    from fused_moonvit.moonvit.runner import default_budgets, octave_budgets

    return {"default": default_budgets(max_budget=top), "octave4": octave_budgets(4, max_budget=top)}


def release(cuda: bool) -> None:
    """Frees the last runner's graphs and pool before the next is captured."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def build_runner(model, budgets: list[int], slots: int, cuda: bool) -> tuple[object, dict]:
    """A runner, captured on CUDA, and what the capture cost."""
    from fused_moonvit.moonvit import MoonVitGraphRunner

    release(cuda)
    before = torch.cuda.memory_reserved() if cuda else 0
    runner = MoonVitGraphRunner(model, budgets=budgets, max_items=slots)
    info = {"budgets": runner.budgets, "graphs": len(runner.budgets), "slots": slots,
            "capture_s": None, "graph_memory_bytes": None, "reserved_bytes": None}
    if cuda:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.capture(progress=False)
        torch.cuda.synchronize()
        info.update(capture_s=time.perf_counter() - t0, graph_memory_bytes=sum(runner.graph_memory().values()),
                    reserved_bytes=torch.cuda.memory_reserved() - before)
    return runner, info


def time_call(runner, pixels, grid, timing: dict) -> tuple[dict, torch.Tensor]:
    """The whole `encode` call and, where it is one replay, that replay alone (the buffers then hold this
    call's plan and pixels, so the replay does the call's device work)."""
    chunks = runner.plan_chunks(grid)
    last = {}
    call = measure(lambda: last.__setitem__("out", runner.encode(pixels, grid)), **timing)
    out = torch.cat(last["out"])
    row = {"budgets": [b for _, _, b in chunks], "ms": call["ms"], "ms_min": call["ms_min"],
           "host_ms": call["host_ms"], "samples_ms": call["samples_ms"], "replay_ms": None}
    if timing["cuda"] and len(chunks) == 1 and chunks[0][2] is not None:
        runner.encode(pixels, grid)
        replay = measure(runner.graphs[chunks[0][2]].replay, **timing)
        row.update(replay_ms=replay["ms"], replay_ms_min=replay["ms_min"], call_minus_replay_ms=call["ms"] - replay["ms"])
    return row, out


def kernel_profile(fn, calls: int, fallback=None) -> dict:
    """Device µs per call by kernel (and copy) name from `torch.profiler`'s CUDA events over `calls` calls.
    If the replayed graph's kernels were not traced (a handful of events per call), `fallback`, the eager
    graph body on the same buffers, is traced instead."""
    from torch.profiler import ProfilerActivity, profile

    from fused_moonvit.benchmarks.bench_profile import category

    def trace(f):
        f()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                f()
            torch.cuda.synchronize()
        per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                per[evt.name][0] += evt.device_time_total / calls
                per[evt.name][1] += 1 / calls
        return per

    traced = "graph replays"
    per = trace(fn)
    if fallback is not None and sum(n for _, n in per.values()) < 20:
        traced = "the eager graph body on the replay's buffers (the replayed kernels were not traced)"
        per = trace(fallback)
    by_cat: dict[str, float] = defaultdict(float)
    for name, (us, _) in per.items():
        by_cat[category(name)] += us
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])
    return {"traced": traced, "calls": calls, "device_us_per_call": sum(us for us, _ in per.values()),
            "launches_per_call": sum(n for _, n in per.values()),
            "by_category_us": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "kernels_us": {name: {"us": us, "per_call": n} for name, (us, n) in ranked}}


def kernel_diff(a: dict, b: dict, top: int = 12) -> list[dict]:
    """The kernels whose µs per call differ most between two profiles (a - b)."""
    names = set(a["kernels_us"]) | set(b["kernels_us"])
    rows = [{"kernel": n, "a_us": a["kernels_us"].get(n, {}).get("us", 0.0),
             "b_us": b["kernels_us"].get(n, {}).get("us", 0.0)} for n in names]
    for r in rows:
        r["diff_us"] = r["a_us"] - r["b_us"]
    return sorted(rows, key=lambda r: -abs(r["diff_us"]))[:top]


def host_steps(model, runner_cls, pixels, grid, slots: int, cuda: bool, reps: int) -> dict:
    """µs of each host step of a call, alone (median of 5 rounds of `reps`)."""
    from fused_moonvit.kernels.plan import new_device_plan, upload_plan
    from fused_moonvit.moonvit.inputs import check_inputs
    from fused_moonvit.moonvit.runner import items_plan

    cfg = model.config
    items = check_inputs(pixels, grid, cfg.patch_size, cfg.max_frames)
    runner = runner_cls(model, budgets=[round_budget(items.patches)], max_items=slots)
    plan = items_plan(items, items.patches, slots)
    device_plan = new_device_plan(slots, model.device)
    values = plan.tolist()

    def us(fn) -> float:
        rounds = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            rounds.append((time.perf_counter() - t0) / reps * 1e6)
        return statistics.median(rounds)

    steps = {
        "check_inputs": us(lambda: check_inputs(pixels, grid, cfg.patch_size, cfg.max_frames)),
        "plan_chunks": us(lambda: runner.plan_chunks(items)),
        "items_plan": us(lambda: items_plan(items, items.patches, slots)),
        "upload_launch": us(lambda: upload_plan(plan, device_plan)),
        "plan_as_before_list_to_tensor": us(lambda: torch.tensor(values, dtype=torch.int32, pin_memory=cuda)),
    }
    if cuda:
        torch.cuda.synchronize()
    return steps


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m fused_moonvit.benchmarks.runner_defaults",
                           description=__doc__.split("\n\n")[0])
    add_out_argument(parser, "runner_defaults.json")
    parser.add_argument("--model", choices=list(FAMILIES), default="kimi-k25",
                        help="whose tower, at its real sizes (default: %(default)s)")
    parser.add_argument("--profile-calls", type=positive_int, default=5,
                        help="calls traced per profile (default %(default)s)")
    add_run_arguments(parser, smoke="CPU, tiny config, sets and ladders, one call per row, no graphs or "
                                    "profiles: checks the script, measures nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, argv = parse_benchmark_args(parser, argv)
    cuda = not args.smoke
    if args.warmup < 0:
        parser.error(f"argument --warmup: must be >= 0, got {args.warmup}")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

    from fused_moonvit.moonvit import FusedMoonVit, MoonVitGraphRunner, build_model

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    fields = dict(FAMILIES[args.model].benchmark)
    if args.smoke:
        fields.update(SMOKE_CONFIG, num_hidden_layers=1)
        if args.model == "kimi-k3":
            fields["qkv_hidden_size"] = 64  # K3's wider qkv: head dim 16 for the smoke's 4 heads
    if args.layers is not None:
        fields["num_hidden_layers"] = args.layers
    config = MoonVitConfig(**fields)
    model = build_model(FusedMoonVit, None, config=config, dtype=dtype, device=device, seed=args.seed)
    sets = SMOKE_SETS if args.smoke else SETS
    padding = SMOKE_PADDING if args.smoke else PADDING
    top = SMOKE_TOP_BUDGET if args.smoke else TOP_BUDGET
    ladder_of = ladders(top)
    timing = dict(cuda=cuda, iters=args.iters, warmup=args.warmup)
    p = config.patch_size

    inputs = {}
    for index, (name, grids) in enumerate(sets.items()):
        gen = torch.Generator().manual_seed(args.seed + 1 + index)
        cpu = torch.rand(set_patches(grids), 3, p, p, generator=gen) * 2 - 1
        inputs[name] = {"cpu_fp32": cpu, "device": cpu.to(device, dtype), "grid": torch.tensor(grids)}

    # Triton compiles a kernel per slot count (the plan's search depth), per attention tile set (one per
    # row of the attention table these budgets fall in) and per position-embedding layout (spread over
    # channel blocks below about 4096 patches): done here, so that the captures below time capture alone.
    t0 = time.perf_counter()
    if cuda:
        for slots in (16, 64):
            for budget in (256, 1024, 4096, 16384):
                build_runner(model, [budget], slots, cuda)
    compile_s = time.perf_counter() - t0 if cuda else None

    configs, outputs = {}, defaultdict(dict)
    input_rows, profiles = {}, defaultdict(dict)
    order = [*CONFIGS, "default_repeat"]
    for key in order:
        ladder, slots = CONFIGS["default" if key == "default_repeat" else key]
        entry = {"ladder": ladder or "one graph of the set's own budget", "slots": slots, "sets": {}}
        if ladder is not None:
            runner, entry["capture"] = build_runner(model, ladder_of[ladder], slots, cuda)
        for name, grids in sets.items():
            if ladder is None:
                runner, captured = build_runner(model, [round_budget(set_patches(grids))], slots, cuda)
            data = inputs[name]
            row, out = time_call(runner, data["device"], data["grid"], timing)
            if ladder is None:
                row["capture"] = captured
            entry["sets"][name] = row
            outputs[key][name] = out
            if cuda and key in PROFILED:
                budget = row["budgets"][0]

                def body(r=runner, b=budget):
                    from fused_moonvit.moonvit.runner import graph_body

                    return graph_body(model, r.pixels[:b], r.device_plan)

                profiles[name][key] = kernel_profile(lambda r=runner, d=data: r.encode(d["device"], d["grid"]),
                                                     args.profile_calls, fallback=body)
            if key == "default" and name != "1x66x64":
                cpu = data["cpu_fp32"]
                on_gpu = cpu.to(device)
                input_rows[name] = {
                    "device_" + str(dtype).removeprefix("torch."): row["ms"],
                    "device_fp32": measure(lambda: runner.encode(on_gpu, data["grid"]), **timing)["ms"],
                    "cpu_fp32": measure(lambda: runner.encode(cpu, data["grid"]), **timing)["ms"],
                    "cpu_fp32_moved_first": measure(lambda: runner.encode(cpu.to(device), data["grid"]),
                                                    **timing)["ms"],
                }
            if ladder is None:
                del runner
        configs[key] = entry
        runner = None
        release(cuda)

    for key in order:
        for name in sets:
            configs[key]["sets"][name]["rel_err_vs_" + BASELINE] = rel_err(outputs[key][name], outputs[BASELINE][name])
    outputs.clear()

    diffs = {name: kernel_diff(by["default"], by[BASELINE]) for name, by in profiles.items()}

    padding_rows = defaultdict(dict)
    for budget in sorted({b for bs in padding.values() for b in bs}):
        runner, captured = build_runner(model, [budget], 16, cuda)
        for name, budgets in padding.items():
            if budget in budgets:
                data = inputs[name]
                row, _ = time_call(runner, data["device"], data["grid"], timing)
                padding_rows[name][budget] = {**row, "padding": budget / set_patches(sets[name]) - 1,
                                              "capture": captured}
        del runner
        release(cuda)
    vllm_picks = {
        list_name: {"token_budgets": tokens, "patch_budgets": [4 * t for t in tokens],
                    "picks": {name: next((4 * t for t in tokens if 4 * t >= set_patches(g)), None)
                              for name, g in sets.items()}}
        for list_name, tokens in VLLM_TOKEN_LISTS.items()}
    ladder_picks = {ladder: {name: next(b for b in budgets if b >= set_patches(g)) for name, g in sets.items()}
                    for ladder, budgets in ladder_of.items()}

    host = {}
    for name in dict.fromkeys([next(iter(sets)), list(sets)[-1]]):
        for slots in (16, 64):
            host[f"{name}, {slots} slots"] = host_steps(model, MoonVitGraphRunner, inputs[name]["device"],
                                                        inputs[name]["grid"], slots, cuda, 20 if args.smoke else 500)

    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    report = {
        "benchmark": "runner_defaults",
        "device": device_name,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "fused_moonvit.benchmarks.runner_defaults", *argv]),
        "smoke": args.smoke,
        "model": args.model,
        "dtype": str(dtype).removeprefix("torch."),
        "config": {k: getattr(config, k) for k in MoonVitConfig._FIELDS},
        "seed": args.seed,
        "timing": ("whole calls: CUDA events around encode on an idle GPU, host work included, median of "
                   f"{args.iters} after {args.warmup}; replay_ms: the same around the graph's replay()"
                   if cuda else "wall clock, one call (smoke)"),
        "sets": {name: {"grids": [list(g) for g in grids], "patches": set_patches(grids),
                        "own_budget": round_budget(set_patches(grids))} for name, grids in sets.items()},
        "ladders": ladder_of,
        "compile_s": compile_s,
        "configs": configs,
        "inputs_ms": input_rows,
        "host_us": host,
        "profiles": dict(profiles),
        "kernel_diff_default_minus_exact16": diffs,
        "padding": dict(padding_rows),
        "ladder_picks": ladder_picks,
        "vllm_lists": vllm_picks,
    }
    path = os.path.join(out_dir(args), "runner_defaults.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(summary(report))
    print(f"wrote {path}")
    return 0


def summary(report: dict) -> str:
    sets = list(report["sets"])
    lines = [f"{'config':<15} {'slots':>5} {'graphs':>6} {'capture s':>9} {'pool MiB':>8}  "
             + "  ".join(f"{s + ' ms (replay)':>22}" for s in sets)]
    for key, entry in report["configs"].items():
        cap = entry.get("capture", {})
        graphs = cap.get("graphs", 1)
        cap_s = "" if cap.get("capture_s") is None else f"{cap['capture_s']:.1f}"
        pool = "" if cap.get("graph_memory_bytes") is None else f"{cap['graph_memory_bytes'] / 2**20:.0f}"
        cells = []
        for s in sets:
            row = entry["sets"][s]
            replay = "" if row["replay_ms"] is None else f" ({row['replay_ms']:.2f})"
            cells.append(f"{row['ms']:.2f}{replay} @{'+'.join(str(b) for b in row['budgets'])}")
        lines.append(f"{key:<15} {entry['slots']:>5} {graphs:>6} {cap_s:>9} {pool:>8}  "
                     + "  ".join(f"{c:>22}" for c in cells))
    if report["inputs_ms"]:
        lines.append("\ndefault runner by input (ms): " + "; ".join(
            f"{s}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()) for s, row in report["inputs_ms"].items()))
    lines.append("\nhost steps (us): " + "; ".join(
        f"{k}: " + ", ".join(f"{n} {v:.1f}" for n, v in steps.items()) for k, steps in report["host_us"].items()))
    lines.append("\npadding (16 slots; ms at budget, +padding):")
    for s, rows in report["padding"].items():
        lines.append(f"  {s}: " + ", ".join(f"{b}: {r['ms']:.2f} (+{100 * r['padding']:.0f}%)" for b, r in rows.items()))
    for s, diff in report["kernel_diff_default_minus_exact16"].items():
        lines.append(f"\n{s}: kernels default minus exact16 (us per call):")
        lines += [f"  {d['diff_us']:+9.1f}  {d['a_us']:9.1f} vs {d['b_us']:9.1f}  {d['kernel'][:90]}" for d in diff[:6]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
