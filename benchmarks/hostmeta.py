"""`HostMetadataGraph`: vLLM's encoder CUDA-graph path (Kimi-VL's in 0.33, Kimi-K2.5's in 0.34), rebuilt in
plain PyTorch.

This is the "host-metadata graph" baseline of docs/design.md section 4.1. Like vLLM, every call builds all the
grid-dependent inputs with PyTorch on the host side of the graph (a bicubic interpolation of the
position table per image, slices of a precomputed complex RoPE table, `cu_seqlens` and the 2x2 merge
gather index), copies them into static buffers, and replays one graph of patch embed -> blocks ->
final norm -> merge gather -> projector. It differs from vLLM on one point on purpose: `max_seqlen` is
baked as the budget in patches (the true bound), not vLLM's output-token budget, which is 4x too small
for attention over patches (docs/design.md section 3.4); the cost is the same.

It reuses the weights of a `MoonVitReference` (no copy), so it is compared on the same model. For a
MoonViT3d model it takes images only, as vLLM's Kimi-K2.5 graphs do (video chunks run eagerly there).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fused_moonvit.moonvit.attention import varlen_attention
from fused_moonvit.moonvit.runner import capture_graph
from fused_moonvit.kernels.limits import MAX_GRID_SIDE, check_budget, check_int
from fused_moonvit.moonvit.inputs import check_inputs
from fused_moonvit.moonvit.modules import rope_frequencies
from fused_moonvit.moonvit.reference import MoonVitReference, rope_angles


def merge_gather_index(grid: list[tuple[int, int]]) -> np.ndarray:
    """Row of each (merged token, sub-token) pair, flattened: sub-tokens (0,0),(0,1),(1,0),(1,1)."""
    parts, base = [], 0
    for h, w in grid:
        rows = 2 * np.arange(h // 2).reshape(-1, 1, 1, 1) + np.arange(2).reshape(1, 1, 2, 1)
        cols = 2 * np.arange(w // 2).reshape(1, -1, 1, 1) + np.arange(2).reshape(1, 1, 1, 2)
        parts.append((base + rows * w + cols).reshape(-1))
        base += h * w
    return np.concatenate(parts).astype(np.int64)


def rope_table(head_dim: int, theta: float, side: int = MAX_GRID_SIDE, device=None) -> torch.Tensor:
    """(side, side, head_dim // 2) complex64 cis table, [row, col] -> per-pair rotation."""
    idx = torch.arange(side * side, device=device)
    angles = rope_angles(idx // side, idx % side, rope_frequencies(head_dim, theta).to(device))
    return torch.polar(torch.ones_like(angles), angles).view(side, side, -1)


class HostMetadataGraph:
    """`graph(pixel_values, grid_hws) -> (sum h/2*w/2, output_size)` over a budget of `budget` patches.

    `max_images` image slots; `graph=None` captures a CUDA graph on CUDA and runs eagerly elsewhere
    (on CPU attention is per-sequence SDPA, since varlen attention is CUDA-only). The returned tensor
    is a fresh copy, not a view of the graph's memory.
    """

    def __init__(self, model: MoonVitReference, budget: int, max_images: int, *, graph: bool | None = None,
                 warmup: int = 2):
        budget = check_budget(budget)
        max_images = check_int("max_images", max_images, 1)
        self.model = model
        self.config = model.config
        self.budget, self.max_images = budget, max_images
        self.device, self.dtype = model.device, model.dtype
        self.graphed = self.device.type == "cuda" if graph is None else graph
        if self.graphed and self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device, got {self.device}")

        c, p, d = self.config.hidden_size, self.config.patch_size, self.config.head_dim
        kw = dict(device=self.device)
        self.rope = rope_table(d, self.config.rope_theta, device=self.device)
        # Padding rows keep whatever the last call left there: finite values, so padding outputs stay
        # finite. The initial values only need to be finite too.
        self.pixel_values = torch.zeros(budget, 3, p, p, dtype=self.dtype, **kw)
        self.pos_embeds = torch.zeros(budget, c, dtype=self.dtype, **kw)
        self.freqs_cis = torch.ones(budget, d // 2, dtype=torch.complex64, **kw)
        self.cu_seqlens = torch.zeros(max_images + 2, dtype=torch.int32, **kw)
        self.cu_seqlens[-1] = budget
        self.gather_idx = torch.zeros(budget, dtype=torch.int64, **kw)
        self._graph = None
        self._out = None
        if self.graphed:
            self._capture(warmup)

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        self._graph, self._out, _ = capture_graph(self._forward, device=self.device, warmup=warmup)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return varlen_attention(q, k, v, self.cu_seqlens, self.budget)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * self.freqs_cis[:, None, :]).flatten(-2).to(x.dtype)

    def _forward(self) -> torch.Tensor:
        """The captured part: static buffers in, (budget / 4, output_size) out."""
        tower, cfg = self.model.vision_tower, self.config
        proj = tower.patch_embed.proj
        x = F.linear(self.pixel_values.flatten(1), proj.weight.flatten(1), proj.bias) + self.pos_embeds
        for block in tower.encoder.blocks:
            qkv = block.wqkv(block.norm0(x)).unflatten(-1, (3, cfg.num_attention_heads, cfg.head_dim))
            q, k, v = qkv.unbind(1)
            attn = self._attention(self._rotate(q), self._rotate(k), v)
            x = x + block.wo(attn.flatten(1))
            x = x + block.mlp(block.norm1(x))
        x = tower.encoder.final_layernorm(x)
        merged = x.index_select(0, self.gather_idx).view(-1, 4, cfg.hidden_size)
        if self.model.projector is None:
            return merged.flatten(1)
        return self.model.projector(merged)

    def _pos_embeds(self, grid: list[tuple[int, int]]) -> torch.Tensor:
        # vLLM interpolates the table in its own dtype and skips the identity size.
        table = self.model.vision_tower.patch_embed.pos_emb.weight
        parts = []
        for h, w in grid:
            if (h, w) == tuple(table.shape[:2]):
                parts.append(table.flatten(0, 1))
            else:
                grid_emb = F.interpolate(table.permute(2, 0, 1)[None], size=(h, w),
                                         mode=self.config.pos_emb_interpolation, align_corners=False)
                parts.append(grid_emb[0].permute(1, 2, 0).flatten(0, 1))
        return torch.cat(parts)

    def _upload(self, dst: torch.Tensor, array: np.ndarray) -> None:
        src = torch.from_numpy(array)
        if dst.is_cuda:
            src = src.pin_memory()
        dst.copy_(src, non_blocking=True)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_hws) -> torch.Tensor:
        items = check_inputs(pixel_values, grid_hws, self.config.patch_size, self.config.max_frames).tolist()
        chunks = [i for i, (t, _, _) in enumerate(items) if t != 1]
        if chunks:
            raise ValueError(f"item {chunks[0]} has t={items[chunks[0]][0]} frames: vLLM's encoder graphs, which "
                             "this baseline rebuilds, take images only (t = 1)")
        grid = [(h, w) for _, h, w in items]
        n, lens = len(grid), [h * w for h, w in grid]
        total = sum(lens)
        if n > self.max_images:
            raise ValueError(f"{n} images exceed this graph's {self.max_images} image slots")
        if total > self.budget:
            raise ValueError(f"the images hold {total} patches, more than this graph's budget of "
                             f"{self.budget} patches (grids {grid})")

        # Host metadata, as vLLM's prepare_encoder_metadata builds it on every call.
        pos_embeds = self._pos_embeds(grid)
        freqs = torch.cat([self.rope[:h, :w].reshape(h * w, -1) for h, w in grid])
        cu = np.empty(self.max_images + 2, dtype=np.int32)
        cu[0] = 0
        cu[1:n + 1] = np.cumsum(lens)
        cu[n + 1:-1] = total
        cu[-1] = self.budget
        gather = np.zeros(self.budget, dtype=np.int64)
        gather[:total] = merge_gather_index(grid)

        self.pixel_values[:total].copy_(pixel_values, non_blocking=True)
        self.pos_embeds[:total].copy_(pos_embeds)
        self.freqs_cis[:total].copy_(freqs)
        self._upload(self.cu_seqlens, cu)
        self._upload(self.gather_idx, gather)

        if self._graph is not None:
            self._graph.replay()
            out = self._out
        else:
            out = self._forward()
        return out[:total // 4].clone()
