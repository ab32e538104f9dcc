"""What the benchmarks share: the smoke config, the run arguments, the two timers (`measure` for whole
calls, host work included; `graph_time_us` for device work alone), and the versions every result file
records."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from fused_moonvit.moonvit.arguments import positive_int

# --smoke's tiny tower, on the CPU: the real structure at sizes the Triton interpreter runs in seconds.
SMOKE_CONFIG = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                    init_pos_emb_height=16, init_pos_emb_width=16, text_hidden_size=24)


def add_run_arguments(parser: argparse.ArgumentParser, smoke: str) -> None:
    """The arguments every whole-encoder benchmark takes: model depth, timing, seed, and --smoke."""
    parser.add_argument("--layers", type=positive_int, metavar="N", help="override num_hidden_layers, for quick runs")
    parser.add_argument("--iters", type=positive_int, default=20, help="timed calls per row (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument("--smoke", action="store_true", help=smoke)


def measure(fn: Callable[[], object], *, cuda: bool, iters: int, warmup: int) -> dict:
    """Times whole calls of `fn`. On CUDA the events bracket the call from an idle GPU, so the elapsed
    time covers host work and device work alike; `host_ms` is the time until the call returned."""
    if not cuda:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"ms": ms, "ms_min": ms, "ms_max": ms, "host_ms": ms, "samples_ms": [ms],
                "timing": "wall clock, one call"}
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    device_ms, host_ms = [], []
    for _ in range(iters):
        start.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        device_ms.append(start.elapsed_time(end))
        host_ms.append((t1 - t0) * 1e3)
    return {"ms": statistics.median(device_ms), "ms_min": min(device_ms), "ms_max": max(device_ms),
            "host_ms": statistics.median(host_ms), "samples_ms": device_ms,
            "timing": f"CUDA events, median of {iters} after {warmup} warm-up calls"}


def graph_time_us(fn: Callable[[], object], *, calls: int = 1, flush_l2: bool = True, rep_ms: int = 100,
                  quantiles: tuple[float, ...] | None = None) -> float | list[float]:
    """Device time in µs of one call of `fn`, no launch cost counted (the launchers' Python checks and
    Triton's argument handling cost tens of µs): `calls` back-to-back calls are captured in one CUDA graph
    and its replays are timed, per call.

    flush_l2: `triton.testing.do_bench` over `rep_ms` of replays with L2 zeroed before each, the median
    (or the `quantiles`, a list). Without: the median of seven replays back to back, timed by CUDA events,
    with L2 as the previous call left it, as inside the captured forward."""
    from fused_moonvit.moonvit.runner import capture_graph

    graph, _, _ = capture_graph(lambda: [fn() for _ in range(calls)], device=torch.cuda.current_device())
    graph.replay()
    torch.cuda.synchronize()
    if flush_l2:
        from triton.testing import do_bench

        ms = do_bench(graph.replay, warmup=25, rep=rep_ms, quantiles=list(quantiles) if quantiles else None,
                      return_mode="median")
        return [q * 1e3 / calls for q in ms] if quantiles else ms * 1e3 / calls
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp64; outputs of another shape than the reference's are refused."""
    if out.shape != ref.shape:
        raise RuntimeError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}
