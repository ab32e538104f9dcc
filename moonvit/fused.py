"""`FusedMoonVit`: the static-shape MoonVit forward of docs/design.md section 3 (`runner.py` captures it as
one CUDA graph per token budget).

The forward works on a budget of B patch rows. A small int32 plan (one row per item slot plus cu_seqlens
and output offsets, built on the host in O(items)) is uploaded once; an item is an image or, for
MoonViT3d, a video chunk of t frames. Everything after that is device work of fixed shape: the plan is
expanded into per-token metadata, and the Triton kernels read it to add the interpolated position (and
time) embedding, rotate q and k, attend within each item, and average a chunk's frames and gather the 2x2
merge; residual adds and LayerNorms (or RMSNorms) run as one kernel. Rows past the last item form one
trailing padding sequence whose outputs are finite and discarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_moonvit.kernels.layernorm import add_layer_norm
from fused_moonvit.kernels.limits import check_budget
from fused_moonvit.kernels.patch_merge import merge_patches
from fused_moonvit.kernels.plan import (META_ITEM, build_plan, expand_plan, new_device_plan, new_token_meta,
                                        plan_cu_seqlens, upload_plan)
from fused_moonvit.kernels.pos_embed import interp_pos_embed
from fused_moonvit.kernels.rope2d import apply_rope_2d, rope_cos_sin_table

from .attention import (LEAKY_BACKENDS, check_attention_dtype, choose_attention, forced_attention_backend,
                        packed_attention)
from .config import MoonVitConfig
from .inputs import check_inputs
from .modules import MoonVitModules, norm_args, rope_frequencies


class FusedMoonVit(MoonVitModules):
    """MoonVit with the fused Triton kernels. Same state-dict keys and `forward` contract as `MoonVitReference`."""

    def __init__(self, config: MoonVitConfig | None = None, attention_backend: str | None = None):
        super().__init__(config)
        self._rope_tables: dict[torch.device, torch.Tensor] = {}
        self._zero_biases: dict[tuple, torch.Tensor] = {}
        # None: the fastest backend available here by the measured table (moonvit/attention.py), unless
        # $FUSED_MOONVIT_ATTENTION says otherwise; a backend's name forces it. Checked here, not first at a
        # forward inside a capture.
        forced_attention_backend(attention_backend)
        self.attention_backend = attention_backend

    @classmethod
    def from_pretrained(cls, model_dir, *, dtype: torch.dtype = torch.bfloat16, device="cuda", **kwargs):
        """Builds the model from a local model directory, or with seeded random weights for None (see
        `build_model`, which takes the other keyword arguments)."""
        from .loading import build_model

        return build_model(cls, model_dir, dtype=dtype, device=device, **kwargs)

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """The fp32 (512, D/4, 2) cos/sin table the RoPE kernel looks up, built once per device."""
        # Kept apart from the module's buffers so that `.to(bfloat16)` cannot round it.
        if device not in self._rope_tables:
            freqs = rope_frequencies(self.config.head_dim, self.config.rope_theta).to(device)
            self._rope_tables[device] = rope_cos_sin_table(freqs)
        return self._rope_tables[device]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, items) -> torch.Tensor:
        """Eager fused forward of exactly these items (images, or video chunks of t frames; an `Items` or
        its grid): (sum h/2*w/2, output_size)."""
        items = check_inputs(pixel_values, items, self.config.patch_size, self.config.max_frames)
        check_attention_dtype(self.device, self.dtype)
        plan = build_plan(items, items.patches, len(items))
        device_plan = upload_plan(plan, new_device_plan(len(items), self.device), budget=items.patches)
        return self.forward_static(pixel_values.to(device=self.device, dtype=self.dtype), device_plan,
                                   max_seqlen=items.longest)[:items.outputs]

    @torch.no_grad()
    def forward_static(self, pixel_values: torch.Tensor, device_plan: torch.Tensor,
                       max_seqlen: int | None = None) -> torch.Tensor:
        """The static forward: (B, 3, p, p) pixels and an uploaded plan for budget B -> (B/4, output_size).

        No host sync on CUDA, and every shape depends on B alone. The plan's last cu_seqlens entry must be
        B, which reading it back to check would sync on: either it was built for B (`build_plan(items, B,
        S)`, uploaded with `upload_plan(plan, buffer, budget=B)`, which checks it on the host), or the
        graph body sets it on the device first (`runner.graph_body`, the path every graph takes).

        max_seqlen: the longest sequence of the plan in patches, the padding sequence included, when the
        caller knows it (the eager forward does); a graph, which must serve any plan, leaves it at B.
        """
        cfg = self.config
        tower = self.vision_tower
        p = cfg.patch_size
        budget = pixel_values.shape[0]
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, p, p):
            raise ValueError(f"pixel_values must be (B, 3, {p}, {p}), got {tuple(pixel_values.shape)}")
        check_budget(budget, "pixel_values' row count B")
        if pixel_values.dtype != self.dtype or pixel_values.device != self.device:
            raise ValueError(f"pixel_values must be {self.dtype} on {self.device} like the model, "
                             f"got {pixel_values.dtype} on {pixel_values.device}")
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        meta = expand_plan(device_plan, new_token_meta(budget, pixel_values.device))
        cu_seqlens = plan_cu_seqlens(device_plan)
        cos_sin = self.rope_table(pixel_values.device)
        attention = choose_attention(budget, pixel_values.device, head_dim, self.attention_backend)
        max_seqlen = budget if max_seqlen is None else max_seqlen
        # Where attention may read across items, an item with a NaN or Inf pixel runs on zeros and gets its
        # NaN back at the end: it is NaN after the first attention anyway, and its neighbours stay exact.
        nonfinite = None
        if attention.backend in LEAKY_BACKENDS:
            nonfinite = nonfinite_item_rows(pixel_values, meta, cu_seqlens.numel() - 2)
            pixel_values = pixel_values.masked_fill(nonfinite[:, None, None, None], 0)

        embed = tower.patch_embed
        x = F.linear(pixel_values.flatten(1), embed.proj.weight.flatten(1))
        x = interp_pos_embed(x, embed.pos_emb.weight, meta, bias=embed.proj.bias,
                             time_table=embed.time_table(pixel_values.device), mode=cfg.pos_emb_interpolation)
        blocks = tower.encoder.blocks
        dtype = pixel_values.dtype
        h = add_layer_norm(x, None, **norm_args(blocks[0].norm0, dtype))
        for i, block in enumerate(blocks):
            qkv = block.wqkv(h)
            apply_rope_2d(qkv, meta, cos_sin, num_heads=heads, head_dim=head_dim)
            attn = packed_attention(qkv, cu_seqlens, heads, head_dim, max_seqlen, attention)
            # The add-and-norm kernel adds the residual (and wo's bias) in one rounding, updates x in place
            # and normalises it for the next step. Where the bias goes was measured on the H200: cuBLAS
            # runs wo (1152 -> 1152) fastest without a bias epilogue, fc1 (4304 -> 1152) with one.
            h = add_layer_norm(x, F.linear(attn, block.wo.weight), **norm_args(block.norm1, dtype),
                               bias=block.wo.bias)
            g = self._fc0_gelu(h, block.mlp.fc0)
            norm = blocks[i + 1].norm0 if i + 1 < len(blocks) else tower.encoder.final_layernorm
            h = add_layer_norm(x, block.mlp.fc1(g), **norm_args(norm, dtype))

        if nonfinite is not None:
            h = h.masked_fill(nonfinite[:, None], float("nan"))
        if self.projector is None:
            return merge_patches(h, meta, max_frames=cfg.max_frames)
        return self.projector.fused_forward(h, meta, cfg.max_frames)

    def _fc0_gelu(self, h: torch.Tensor, fc0: torch.nn.Linear) -> torch.Tensor:
        """gelu_tanh(fc0(h)). On CUDA, bias and GELU run in cuBLASLt's epilogue (its GELU is the tanh
        approximation; the GPU tests hold it to that), so the activation is rounded once and not re-read.
        A layer without bias (Kimi-K3) gets a zero one, which adds exactly nothing, for the same epilogue."""
        if not h.is_cuda:
            return F.gelu(F.linear(h, fc0.weight, fc0.bias), approximate="tanh")
        bias = fc0.bias
        if bias is None:
            # Made at the first call, which a capture's warm-up runs outside the graph.
            key = (h.device, h.dtype, fc0.out_features)
            if key not in self._zero_biases:
                self._zero_biases[key] = torch.zeros(fc0.out_features, dtype=h.dtype, device=h.device)
            bias = self._zero_biases[key]
        return torch._addmm_activation(bias, h, fc0.weight.t(), use_gelu=True)


def nonfinite_item_rows(pixel_values: torch.Tensor, token_meta: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B,) bool: the rows of every item (of `num_slots` slots) that holds a NaN or Inf pixel anywhere, from
    the expanded plan's item column; padding rows are never marked. Device work only (capturable)."""
    item = token_meta[META_ITEM].long()
    row_bad = ~torch.isfinite(pixel_values.flatten(1)).all(1)
    # Slot s counts at s + 1; padding (-1) at 0, never read back.
    bad = torch.zeros(num_slots + 1, dtype=torch.int32, device=pixel_values.device)
    bad.index_add_(0, item + 1, row_bad.int())
    return (bad[item + 1] > 0) & (item >= 0)
