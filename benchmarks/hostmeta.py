"""`HostMetadataGraph`: vLLM's encoder CUDA-graph path (Kimi-VL's in 0.33, Kimi-K2.5's in 0.34), rebuilt in
plain PyTorch, and `VllmEagerTower`: vLLM's eager MoonViT3d, which is how vLLM 0.34 runs Kimi-K2.5's video
chunks (its encoder graphs take images only).

This is the "host-metadata graph" baseline of docs/design.md section 4.1. Like vLLM, every call builds all the
grid-dependent inputs with PyTorch on the host side of the graph (a bicubic interpolation of the
position table per image, `freqs_cis`: slices of a complex RoPE table precomputed once, `cu_seqlens` and
the 2x2 merge gather index), copies them into static buffers, and replays one graph of patch embed ->
blocks -> final norm -> merge gather -> projector. It differs from vLLM on one point on purpose:
`max_seqlen` is baked as the budget in patches (the true bound), not vLLM's output-token budget, which is
4x too small for attention over patches (docs/design.md section 3.4); the cost is the same.

RoPE inside the blocks is applied as vLLM 0.34 applies it for the tower (`baseline_rope`): MoonViT3d
(Kimi-K2.5 / K2.6 / K3) rotates q and k in place inside the packed QKV buffer with one Triton launch per
layer (benchmarks/vllm_rope.py, vLLM's `packed_qk_rope_` contract); Kimi-VL's MoonVit still rotates them
through complex64 tensors (vLLM's `moonvit.apply_rope`).

Both reuse the weights of a `MoonVitReference` (no copy), so they are compared on the same model, and
both take the attention vLLM runs: "fa3" (vLLM's FlashAttention-3, what vLLM picks for ViT attention on
Hopper, head dim rounded up to 96 inside the kernel) or "fa2" (PyTorch's FlashAttention-2, a stand-in for
vLLM's FA2 elsewhere). The graph takes images only, as vLLM's Kimi-K2.5 graphs do.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fused_moonvit.benchmarks.vllm_rope import packed_qk_rope_
from fused_moonvit.moonvit.attention import backend_unavailable_reason, fa3_varlen, varlen_attention
from fused_moonvit.moonvit.runner import capture_graph
from fused_moonvit.kernels.limits import MAX_GRID_SIDE, check_budget, check_int
from fused_moonvit.moonvit.inputs import check_inputs
from fused_moonvit.moonvit.modules import rope_frequencies
from fused_moonvit.moonvit.reference import MoonVitReference, merge_2x2, rope_angles

VLLM_ATTENTION = ("fa3", "fa2")

# How vLLM 0.34 applies the 2D RoPE in each tower (MoonVitConfig.tower), as the benchmarks record it.
BASELINE_ROPE = {
    "moonvit3d": "in place in the packed QKV buffer, one Triton launch per layer (benchmarks/vllm_rope.py, "
                 "vLLM 0.34's packed_qk_rope_ contract, as its MoonViT3d runs it), from the per-call freqs_cis",
    "moonvit": "q and k through complex64 tensors in every layer (vLLM 0.34's moonvit.apply_rope, as its "
               "Kimi-VL MoonVit runs it), from the per-call freqs_cis",
}


def baseline_rope(tower: str) -> str:
    """How the vLLM baseline of `tower` applies RoPE, in words."""
    if tower not in BASELINE_ROPE:
        raise ValueError(f"tower must be one of {', '.join(BASELINE_ROPE)}, got {tower!r}")
    return BASELINE_ROPE[tower]


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


def call_freqs_cis(table: torch.Tensor, items) -> torch.Tensor:
    """(sum t*h*w, head_dim // 2) complex64: the per-call `freqs_cis` vLLM 0.34 builds on the device from
    its precomputed `table` (`rope_table`), each (t, h, w) item's [:h, :w] slice repeated over its frames."""
    return torch.cat([table[:h, :w].reshape(h * w, -1).repeat(t, 1) for t, h, w in items])


def check_vllm_attention(attention: str, device: torch.device) -> str:
    if attention not in VLLM_ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(VLLM_ATTENTION)}, got {attention!r}")
    reason = backend_unavailable_reason(attention, device)
    if reason is not None:
        raise RuntimeError(f"vLLM's FA3 cannot run on {device} here: {reason}")
    return attention


def vllm_attention(attention: str, q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Attention over every sequence of cu_seqlens as vLLM 0.34's MMEncoderAttention runs it: FA3 into a
    zeroed output (vLLM zeroes it while capturing, so that padding rows stay finite), or FA2."""
    if attention == "fa3":
        return fa3_varlen(q, k, v, cu_seqlens, max_seqlen, torch.zeros_like(q, memory_format=torch.contiguous_format))
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen)


def tower_blocks(model: MoonVitReference, pixel_values, pos_embeds, freqs_cis, attend) -> torch.Tensor:
    """Patch embed + position embedding, the blocks with RoPE by `freqs_cis` as vLLM 0.34 applies it for
    the tower (`baseline_rope`) and `attend(q, k, v)`, and the final norm: vLLM's tower up to the merge."""
    tower, cfg = model.vision_tower, model.config
    proj = tower.patch_embed.proj
    x = F.linear(pixel_values.flatten(1), proj.weight.flatten(1), proj.bias) + pos_embeds
    in_place = cfg.tower == "moonvit3d"

    def rotate(t: torch.Tensor) -> torch.Tensor:
        tc = torch.view_as_complex(t.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(tc * freqs_cis[:, None, :]).flatten(-2).to(t.dtype)

    for block in tower.encoder.blocks:
        qkv = block.wqkv(block.norm0(x)).unflatten(-1, (3, cfg.num_attention_heads, cfg.head_dim))
        if in_place:
            # q, k and v stay views of the packed buffer, as attention takes them in vLLM.
            q, k, v = packed_qk_rope_(qkv, freqs_cis).unbind(1)
        else:
            q, k, v = qkv.unbind(1)
            q, k = rotate(q), rotate(k)
        x = x + block.wo(attend(q, k, v).flatten(1))
        x = x + block.mlp(block.norm1(x))
    return tower.encoder.final_layernorm(x)


def item_pos_embeds(model: MoonVitReference, items) -> torch.Tensor:
    """Each (t, h, w) item's position embedding as vLLM builds it per call: the table interpolated in its
    own dtype (the identity size skipped), plus, for a chunk, its frames' fp32 time rows."""
    cfg = model.config
    table = model.vision_tower.patch_embed.pos_emb.weight
    time = model.vision_tower.patch_embed.time_table(table.device)
    parts = []
    for t, h, w in items:
        if (h, w) == tuple(table.shape[:2]):
            pe = table.flatten(0, 1)
        else:
            grid_emb = F.interpolate(table.permute(2, 0, 1)[None], size=(h, w),
                                     mode=cfg.pos_emb_interpolation, align_corners=False)
            pe = grid_emb[0].permute(1, 2, 0).flatten(0, 1)
        parts.append(pe if t == 1 else (pe.float()[None] + time[:t, None]).flatten(0, 1).to(pe.dtype))
    return torch.cat(parts)


class VllmEagerTower:
    """`tower(pixel_values, items) -> (sum h/2*w/2, output_size)`: vLLM 0.34's eager MoonViT3d over one
    call's items, how it runs Kimi-K2.5's video chunks: per-call metadata on the host side, exact sizes,
    attention over every item's t*h*w patches with max_seqlen the longest item, each item's frames
    averaged before the 2x2 merge."""

    def __init__(self, model: MoonVitReference, attention: str = "fa3"):
        self.model = model
        self.attention = check_vllm_attention(attention, model.device)
        self.rope = rope_table(model.config.head_dim, model.config.rope_theta, device=model.device)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, items) -> torch.Tensor:
        cfg = self.model.config
        items = check_inputs(pixel_values, items, cfg.patch_size, cfg.max_frames)
        device = self.model.device
        freqs = call_freqs_cis(self.rope, items)
        bounds = items.offsets
        cu = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
        longest = items.longest
        x = tower_blocks(self.model, pixel_values.to(device, self.model.dtype), item_pos_embeds(self.model, items),
                         freqs, lambda q, k, v: vllm_attention(self.attention, q, k, v, cu, longest))
        merged = torch.cat([merge_2x2(x[s:e], h, w, t) for s, e, (t, h, w) in zip(bounds, bounds[1:], items)])
        return merged.flatten(1) if self.model.projector is None else self.model.projector(merged)


class HostMetadataGraph:
    """`graph(pixel_values, items) -> (sum h/2*w/2, output_size)` over a budget of `budget` patches.

    `max_images` image slots; `graph=None` captures a CUDA graph on CUDA and runs eagerly elsewhere
    (on CPU attention is per-sequence SDPA, since varlen attention is CUDA-only). The returned tensor
    is a fresh copy, not a view of the graph's memory.
    """

    def __init__(self, model: MoonVitReference, budget: int, max_images: int, *, graph: bool | None = None,
                 warmup: int = 2, attention: str = "fa2"):
        budget = check_budget(budget)
        self.attention = check_vllm_attention(attention, model.device)
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

    def _forward(self) -> torch.Tensor:
        """The captured part: static buffers in, (budget / 4, output_size) out."""
        x = tower_blocks(self.model, self.pixel_values, self.pos_embeds, self.freqs_cis,
                         lambda q, k, v: vllm_attention(self.attention, q, k, v, self.cu_seqlens, self.budget))
        merged = x.index_select(0, self.gather_idx).view(-1, 4, self.config.hidden_size)
        if self.model.projector is None:
            return merged.flatten(1)
        return self.model.projector(merged)

    def _upload(self, dst: torch.Tensor, array: np.ndarray) -> None:
        src = torch.from_numpy(array)
        if dst.is_cuda:
            src = src.pin_memory()
        dst.copy_(src, non_blocking=True)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, items) -> torch.Tensor:
        items = check_inputs(pixel_values, items, self.config.patch_size, self.config.max_frames).rows
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
        pos_embeds = item_pos_embeds(self.model, items)
        freqs = call_freqs_cis(self.rope, items)
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
