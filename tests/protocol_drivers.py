"""Drivers of `fused_moonvit.integration.encoder_graph` in the order each vLLM release's encoder CUDA-graph
manager uses it, without vLLM (the GPU machine has none). Written from the managers' documented behaviour,
not copied from them:

- "per_budget" (vLLM 0.33): every budget captures its own buffers; a call packs the images, smallest first,
  into as many replays as it takes (each at most the largest budget and the slot count), and an image
  alone above the largest budget runs eagerly.
- "shared_prefix" (vLLM 0.34): budgets are captured largest first, and each smaller budget's buffers, the
  output buffer included, are row-prefix views of the largest budget's (its capture values copied in),
  where the trailing shape and dtype allow. A call sorts its images largest first and replays once, into
  the smallest budget that holds the whole batch; a batch above the largest budget, or with more images
  than slots, runs eagerly in one forward.

Both copy replay values in through the module's padding logics, as both releases do when the model's
config names them. `capture` makes the graph: a real `torch.cuda.graph` capture on the GPU, or
`RerunGraph` on the CPU.

With `frames` (a MoonViT3d model's frame factors, `encoder_graph.frame_factors`), both capture every
budget once per factor, as a capture axis (graphs keyed (budget, k), buffers shared within one k only),
and a batch replays the graph of the factor `encoder_graph.frame_factor` picks for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fused_moonvit.integration import encoder_graph as eg
from fused_moonvit.kernels.limits import MERGE_PATCHES


class RerunGraph:
    """A captured graph's stand-in on the CPU: replay reruns the body on the recorded buffers."""

    def __init__(self, body: Callable[[], torch.Tensor]):
        self.body = body

    def replay(self) -> None:
        self.body()


def rerun_capture(body: Callable[[], torch.Tensor]) -> RerunGraph:
    body()
    return RerunGraph(body)


def cuda_graph_capture(pool) -> Callable:
    """Captures `body` as a CUDA graph in `pool` after one eager warm-up run, as the managers do."""

    def capture(body: Callable[[], torch.Tensor]) -> torch.cuda.CUDAGraph:
        body()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            body()
        torch.cuda.synchronize()
        return graph

    return capture


class Graph:
    def __init__(self, token_budget: int, slots: int, buffers: dict, output: torch.Tensor, graph):
        self.token_budget, self.slots, self.buffers = token_budget, slots, buffers
        self.output, self.graph = output, graph


class ProtocolDriver:
    """One manager's use of the protocol for `encoder` (layout: "per_budget" or "shared_prefix").

    `slots`: the item slots of every budget, or a {token_budget: slots} map to give budgets different
    plan sizes (each replay is then built for its graph's slots). `frames`: the frame factors of a
    MoonViT3d model (None: one images-only graph per budget). Graphs are keyed by token budget, or by
    (budget, k) with frame factors."""

    def __init__(self, encoder, token_budgets: list[int], slots: int | dict[int, int], layout: str,
                 capture: Callable, frames: tuple[int, ...] | None = None):
        if layout not in ("per_budget", "shared_prefix"):
            raise ValueError(f"layout must be 'per_budget' or 'shared_prefix', got {layout!r}")
        self.encoder, self.layout, self.capture_graph, self.frames = encoder, layout, capture, frames
        self.token_budgets = sorted(token_budgets)
        self.slots = slots if isinstance(slots, dict) else dict.fromkeys(self.token_budgets, slots)
        self.graphs: dict = {}
        self.replays: list = []  # graph key of each replay
        self.runs: list[tuple[list[int], object]] = []  # (items, graph key or None) of each batch run

    def key(self, budget: int, k: int | None):
        return budget if k is None else (budget, k)

    def capture(self) -> None:
        for k in (self.frames or (None,)):
            self._capture_group(k)

    def _capture_group(self, k: int | None) -> None:
        shared: dict[str, torch.Tensor] | None = None
        shared_output: torch.Tensor | None = None
        for budget in sorted(self.token_budgets, reverse=True):
            buffers = eg.capture_buffers(self.encoder, budget, self.slots[budget], self.encoder.device,
                                         self.encoder.dtype, k)
            if self.layout == "shared_prefix":
                if shared is None:
                    shared = buffers
                else:
                    buffers = {key: self._prefix_view(shared[key], buf) for key, buf in buffers.items()}
            with torch.inference_mode():
                rows = eg.graph_forward(self.encoder, dict(buffers)).shape[0]
            if self.layout == "shared_prefix" and shared_output is not None:
                output = shared_output[:rows]
            else:
                output = torch.empty(rows, self.encoder.config.output_size, device=self.encoder.device,
                                     dtype=self.encoder.dtype)
                shared_output = output if self.layout == "shared_prefix" else None

            def body(buffers=buffers, output=output):
                with torch.inference_mode():
                    output.copy_(eg.graph_forward(self.encoder, dict(buffers)))

            self.graphs[self.key(budget, k)] = Graph(budget, self.slots[budget], buffers, output,
                                                     self.capture_graph(body))

    @staticmethod
    def _prefix_view(full: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        if (full.dim() != own.dim() or full.shape[1:] != own.shape[1:] or full.dtype != own.dtype
                or own.shape[0] > full.shape[0]):
            return own
        view = full[: own.shape[0]]
        view.copy_(own)
        return view

    def encode(self, pixel_values: torch.Tensor, grid: list[list[int]]) -> list[torch.Tensor]:
        """Per-item outputs, in the input order, each a fresh tensor."""
        tokens = item_tokens(grid)
        results: list[torch.Tensor | None] = [None] * len(grid)
        for batch, budget in self._batches(tokens):
            pixels, batch_grid = eg.select_items(pixel_values, grid, batch)
            if budget is None:
                self.runs.append((batch, None))
                out = self.encoder(pixels, batch_grid)
            else:
                key = self.key(budget, None if self.frames is None else eg.frame_factor(batch_grid, self.frames))
                self.runs.append((batch, key))
                out = self._replay(key, pixels, batch_grid)
            for i, part in zip(batch, out[: sum(tokens[i] for i in batch)].split([tokens[i] for i in batch])):
                results[i] = part.clone()
        return results

    def _batches(self, tokens: list[int]) -> list[tuple[list[int], int | None]]:
        """(images, token budget or None for eager) per replay, in order."""
        if self.layout == "shared_prefix":
            batch = sorted(range(len(tokens)), key=lambda i: -tokens[i])
            fitting = (b for b in self.token_budgets if b >= sum(tokens) and self.slots[b] >= len(batch))
            budget = next(fitting, None)
            return [(batch, budget)]
        largest, slots = self.token_budgets[-1], min(self.slots.values())
        batches, current = [], []

        def close() -> None:
            total = sum(tokens[j] for j in current)
            batches.append((list(current), next(b for b in self.token_budgets if b >= total)))
            current.clear()

        for i in sorted(range(len(tokens)), key=lambda i: tokens[i]):
            if tokens[i] > largest:
                batches.append(([i], None))
                continue
            if current and (len(current) == slots or sum(tokens[j] for j in current) + tokens[i] > largest):
                close()
            current.append(i)
        if current:
            close()
        return batches

    def _replay(self, key, pixels: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
        graph = self.graphs[key]
        values = eg.replay_values(self.encoder, pixels, grid, graph.slots)
        for name, buffer in graph.buffers.items():
            eg.PADDING_LOGICS[name](buffer, values[name])
        graph.graph.replay()
        self.replays.append(key)
        # Padding rows too: they are one padding sequence up to the graph's budget, never undefined rows.
        assert torch.isfinite(graph.output).all(), f"non-finite rows in the output of the {key} graph"
        return graph.output


def item_tokens(grid) -> list[int]:
    """Output tokens of each (h, w) or (t, h, w) item: h/2 * w/2."""
    return [row[-2] * row[-1] // MERGE_PATCHES for row in grid]


def poison(driver: ProtocolDriver, seed: int) -> None:
    """Leaves in every captured buffer what another budget's capture or replay could: NaN pixels (255
    in a raw uint8 buffer) and a random plan."""
    g = torch.Generator().manual_seed(seed)
    for graph in driver.graphs.values():
        pixels = graph.buffers[eg.PIXELS_KEY]
        pixels.fill_(255 if pixels.dtype == torch.uint8 else float("nan"))
        plan = graph.buffers[eg.PLAN_KEY]
        plan.copy_(torch.randint(-(2**20), 2**20, plan.shape, generator=g, dtype=torch.int32))


def clean_outputs(encoder, pixel_values: torch.Tensor, grid: list[list[int]], batch: list[int],
                  token_budget: int, slots: int, frames: int | None = None) -> list[torch.Tensor]:
    """The items `batch` through the graph body's computation at `token_budget` and frame factor
    `frames`, without a graph: zero padding rows and a plan built for the budget on the host."""
    from fused_moonvit.kernels.plan import build_plan, new_device_plan, upload_plan

    pixels, batch_grid = eg.select_items(pixel_values, grid, batch)
    rows = eg.patch_budget(token_budget, frames)
    padded = torch.zeros(rows, *pixels.shape[1:], device=pixels.device, dtype=pixels.dtype)
    padded[: pixels.shape[0]] = pixels
    plan = upload_plan(build_plan(batch_grid, rows, slots), new_device_plan(slots, pixels.device), budget=rows)
    out = encoder.forward_static(padded, plan)
    tokens = item_tokens(batch_grid)
    return list(out[: sum(tokens)].split(tokens))


def check_sets(driver: ProtocolDriver, image_sets: dict[str, list[tuple[int, ...]]], *, tolerance: float,
               poison_before: set[str] = frozenset(), seed: int = 0) -> dict[str, dict]:
    """Encodes each set through `driver`, in order, and checks every image's output against the eager
    `FusedMoonVit.forward` (relative error <= tolerance) and, for items that went through a graph, against
    the same budget's computation on clean buffers (bitwise: stale rows must change nothing). Returns the
    replays, eager batches and errors per set."""
    from moonvit_fixtures import random_pixels, rel_err

    encoder = driver.encoder
    figures = {}
    for k, (name, grids) in enumerate(image_sets.items()):
        if name in poison_before:
            poison(driver, seed + k)
        grid = [list(g) for g in grids]
        pixel_values = random_pixels(grid, patch_size=encoder.config.patch_size, seed=seed + k).to(
            encoder.device, encoder.dtype)
        first_run, first_replay = len(driver.runs), len(driver.replays)
        got = driver.encode(pixel_values, grid)
        tokens = item_tokens(grid)
        want = encoder(pixel_values, grid).split(tokens)
        errors = []
        for out, ref in zip(got, want):
            assert out.shape == ref.shape
            assert torch.isfinite(out).all(), f"{name}: non-finite output"
            errors.append(rel_err(out, ref))
        assert max(errors) <= tolerance, f"{name}: graph vs eager relative errors {errors}"
        for batch, key in driver.runs[first_run:]:
            if key is None:
                continue
            budget, k = key if isinstance(key, tuple) else (key, None)
            clean = clean_outputs(encoder, pixel_values, grid, batch, budget, driver.graphs[key].slots, k)
            for i, ref in zip(batch, clean):
                assert torch.equal(got[i], ref), f"{name}: item {i} differs from a clean run at graph {key}"
        figures[name] = {"grids": grid, "replays": driver.replays[first_replay:],
                         "eager_batches": [len(b) for b, key in driver.runs[first_run:] if key is None],
                         "max_rel_err_vs_eager": max(errors)}
    return figures
