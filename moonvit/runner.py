"""`MoonVitGraphRunner`, which runs a `FusedMoonVit` as one CUDA graph per patch budget, and what every
graph of this project is made of, the runner's and the vLLM plugin's (integration/encoder_graph.py) alike:

- `items_plan`, the host step: the plan of a call's items, built without the graph's budget;
- `graph_body`, what a graph records: the plan's padding sequence ended at the graph's budget, then the
  static forward;
- `capture_graph`, the capture helper (the benchmarks' baselines use it too).

Pixel rows past the last item belong to the padding sequence whatever they hold (another call's pixels,
NaN): the position-embedding kernel zeroes them, attention keeps sequences apart, and their outputs are
discarded, so a call copies in its items' rows only.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence

import torch

from fused_moonvit.kernels.items import Items
from fused_moonvit.kernels.limits import MERGE_PATCHES, check_budget, check_int
from fused_moonvit.kernels.plan import build_plan, extend_padding_sequence, new_device_plan, upload_plan

from .attention import check_attention_dtype, choose_attention
from .fused import FusedMoonVit
from .inputs import check_inputs


def items_plan(items: Items | Sequence[Sequence[int]], rows: int, slots: int) -> torch.Tensor:
    """The host plan of `items` (validated) in `slots` item slots, for a graph of any budget of at least
    `rows` patch rows: built for `rows` rounded up to the merge, it ends where the items' rows do, and
    `graph_body` ends its padding sequence at the graph's own budget. So neither the runner nor vLLM's
    replay preparation (which is not told the budget) needs the budget to build it."""
    return build_plan(items, max(-(-rows // MERGE_PATCHES), 1) * MERGE_PATCHES, slots)


def graph_body(model: FusedMoonVit, pixels: torch.Tensor, device_plan: torch.Tensor) -> torch.Tensor:
    """What a graph records: (B, 3, p, p) pixels and an uploaded `items_plan` -> (B/4, output_size).
    The plan's padding sequence is ended at B on the device first, so it equals `build_plan(items, B, S)`
    at every replay of a graph captured for B rows."""
    extend_padding_sequence(device_plan, pixels.shape[0])
    return model.forward_static(pixels, device_plan)


def capture_graph(fn, *, device: torch.device | str, pool=None, warmup: int = 1):
    """(graph, output, pool growth in bytes): `fn` warmed up on a side stream (Triton compiles, cuBLAS
    picks its kernels, the allocator settles), then captured on `device`."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # torch.cuda.graph empties the cache as it starts anyway; doing it first makes `before` the
        # memory in use, so the difference is what the capture itself took.
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        torch.cuda.synchronize()
        return graph, out, torch.cuda.memory_reserved() - before


LADDER_STEP = 64  # patches: the default ladder's budgets are multiples of this, below its top


def default_budgets(max_budget: int = 16384, min_budget: int = 64) -> list[int]:
    """The runner's default ladder, `octave_budgets(8)`: 48 graphs from 64 to 16384 patches, every power of
    two among them, padding at most 10% above 4096 patches, as vLLM 0.34's own encoder grid does. (The
    ladder before it stepped by a quarter and skipped 4096: one 896 px image ran in a 5056-patch graph,
    15% slower on an H100, docs/design.md section 3.5.)"""
    return octave_budgets(8, max_budget, min_budget)


def octave_budgets(steps_per_octave: int, max_budget: int = 16384, min_budget: int = 64) -> list[int]:
    """A ladder anchored on powers of two: min_budget * 2^k for every k up to max_budget, and between two
    anchors `steps_per_octave` - 1 budgets at geometric steps of 2^(1/steps_per_octave), rounded up to
    multiples of `LADDER_STEP` (so low octaves get fewer). Square 448 and 896 px images and 16 images of
    448 px then fit a budget exactly, and above 4096 patches a budget pads at most 2^(1/steps) - 1 plus
    the rounding: 8 steps pad under 10%, as densely as vLLM 0.34's default encoder grid does there."""
    steps = check_int("steps_per_octave", steps_per_octave, 1)
    min_budget, max_budget = check_budget(min_budget, "min_budget"), check_budget(max_budget, "max_budget")
    if max_budget < min_budget:
        raise ValueError(f"max_budget {max_budget} is below min_budget {min_budget}")
    budgets = {max_budget}
    anchor = min_budget
    while anchor < max_budget:
        budgets.add(anchor)
        for j in range(1, steps):
            budget = math.ceil(anchor * 2 ** (j / steps) / LADDER_STEP) * LADDER_STEP
            if budget < min(2 * anchor, max_budget):
                budgets.add(budget)
        anchor *= 2
    return sorted(budgets)


class MoonVitGraphRunner:
    """Runs a `FusedMoonVit` as one CUDA graph per patch budget, all graphs in one memory pool.

    `encode` packs the items (images, and video chunks of t frames) of a call, in order, greedily into
    chunks of at most the largest budget and `max_items` items, and replays the smallest graph that holds
    each chunk. An item larger than the largest budget runs eagerly on its own. Each call's host work is
    O(items): one plan build and upload per chunk. On the CPU there are no graphs: the same chunks run through the fused eager forward.

    All budgets share one pixel buffer and one plan buffer. `encode` is safe to call from several threads
    (calls take turns) and from several CUDA streams: each call's uploads wait, on the device, for the
    last replay that read the buffers, whichever stream it ran on, and its outputs are copies. Call
    `capture()` before serving: a budget not captured yet is captured on first use, which synchronizes
    the device in the middle of a call (a warning says so).
    """

    def __init__(self, model: FusedMoonVit, budgets: Sequence[int] | None = None, max_items: int = 64,
                 warn_on_lazy_capture: bool = True):
        self.model = model.eval()
        budgets = default_budgets() if budgets is None else list(budgets)
        if not budgets:
            raise ValueError("budgets must name at least one patch budget")
        self.budgets = sorted({check_budget(b, "each budget") for b in budgets})
        self.max_items = check_int("max_items", max_items, 1)
        self.device = model.device
        check_attention_dtype(self.device, model.dtype)
        # A bad $FUSED_MOONVIT_ATTENTION, or a forced backend that cannot run here, fails here.
        for budget in self.budgets:
            self.attention_choice(budget)
        model.rope_table(self.device)  # built here, never inside a capture
        model.vision_tower.patch_embed.time_table(self.device)
        p = model.config.patch_size
        self.pixels = torch.zeros(self.budgets[-1], 3, p, p, dtype=model.dtype, device=self.device)
        self.device_plan = new_device_plan(self.max_items, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.memory: dict[int, int] = {}
        self._pool = None
        self._lock = threading.Lock()
        self._buffers_released: torch.cuda.Event | None = None
        # A server should capture up front; a one-shot command (the CLI) captures on first use on purpose.
        self._warned_lazy_capture = not warn_on_lazy_capture

    def attention_choice(self, budget: int):
        """The attention backend (and tiles) the graph of `budget` runs, as `forward_static` chooses it."""
        return choose_attention(budget, self.device, self.model.config.head_dim, self.model.attention_backend)

    @property
    def uses_graphs(self) -> bool:
        return self.device.type == "cuda"

    def capture(self, progress: bool = True) -> None:
        """Captures every budget's graph (largest first, so the smaller ones reuse the pool's memory)."""
        if not self.uses_graphs:
            raise RuntimeError(f"CUDA graphs need a CUDA model; this one is on {self.device}")
        from tqdm import tqdm

        with self._lock:
            todo = [b for b in reversed(self.budgets) if b not in self.graphs]
            for budget in tqdm(todo, desc="capturing encoder graphs", unit="graph", disable=not progress):
                self._capture_one(budget)

    def _capture_one(self, budget: int) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self._claim_buffers()
        # An all-padding plan: capture must not depend on what the items will be.
        upload_plan(build_plan([], budget, self.max_items), self.device_plan, budget=budget)
        pixels = self.pixels[:budget]
        graph, out, grown = capture_graph(lambda: graph_body(self.model, pixels, self.device_plan),
                                          device=self.device, pool=self._pool)
        self.graphs[budget], self.outputs[budget], self.memory[budget] = graph, out, grown

    def _claim_buffers(self) -> None:
        # Device-side ordering: what the current stream does next waits for the last work that read the
        # shared buffers, even if that ran on another stream.
        if self.uses_graphs and self._buffers_released is not None:
            torch.cuda.current_stream(self.device).wait_event(self._buffers_released)

    def _release_buffers(self) -> None:
        if self.uses_graphs:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._buffers_released = event

    def graph_memory(self) -> dict[int, int]:
        """Bytes the shared pool grew by when each budget's graph was captured."""
        return dict(self.memory)

    def plan_chunks(self, items) -> list[tuple[int, int, int | None]]:
        """Splits items (an `Items`, or its grid of (h, w) images or (t, h, w) rows), in order, into
        (first, end, budget) chunks; budget None means run eagerly."""
        items = Items.of(items)
        largest = self.budgets[-1]
        chunks: list[tuple[int, int, int | None]] = []
        start, patches = 0, 0

        def close(end: int) -> None:
            nonlocal start, patches
            if end > start:
                chunks.append((start, end, next(b for b in self.budgets if b >= patches)))
            start, patches = end, 0

        for i, (t, h, w) in enumerate(items):
            if t * h * w > largest:
                close(i)
                chunks.append((i, i + 1, None))
                start = i + 1
                continue
            if i - start == self.max_items or patches + t * h * w > largest:
                close(i)
            patches += t * h * w
        close(len(items))
        return chunks

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, items) -> list[torch.Tensor]:
        """Per-item outputs, (h/2*w/2, output_size) each, for any number of items of any size (an `Items`,
        or its grid of (h, w) images or (t, h, w) rows)."""
        items = check_inputs(pixel_values, items, self.model.config.patch_size, self.model.config.max_frames)
        offsets = items.offsets
        results: list[torch.Tensor] = []
        with self._lock:
            for first, end, budget in self.plan_chunks(items):
                pixels = pixel_values[offsets[first]:offsets[end]]
                chunk = items[first:end]
                if budget is None:
                    out = self.model(pixels, chunk)
                else:
                    out = self._run(budget, pixels, chunk)
                results += list(out.split(list(chunk.tokens)))
        return results

    def _run(self, budget: int, pixels: torch.Tensor, items: Items) -> torch.Tensor:
        if self.uses_graphs and budget not in self.graphs:
            if not self._warned_lazy_capture:
                warnings.warn(f"MoonVitGraphRunner: capturing the {budget}-patch graph on first use, which "
                              "synchronizes the device mid-call; call runner.capture() before serving",
                              stacklevel=3)
                self._warned_lazy_capture = True
            self._capture_one(budget)  # before the upload: capture runs an all-padding plan
        if items.patches > budget:  # plan_chunks' invariant; past it the graph would run a wrong plan
            raise ValueError(f"{items.patches} patches do not fit the {budget}-patch graph")
        plan = items_plan(items, items.patches, self.max_items)
        self._claim_buffers()
        upload_plan(plan, self.device_plan)
        # Not non-blocking from host memory: a caller could refill a pinned buffer before the copy ran.
        self.pixels[:pixels.shape[0]].copy_(pixels, non_blocking=pixels.device.type != "cpu")
        n_out = items.outputs
        if not self.uses_graphs:
            return graph_body(self.model, self.pixels[:budget], self.device_plan)[:n_out]
        self.graphs[budget].replay()
        # The pool is shared, so the next replay may reuse this memory: copy the valid rows out.
        out = self.outputs[budget][:n_out].clone()
        self._release_buffers()
        return out

