"""Fused Triton kernels of the MoonVit forward, and the per-call plan they read.

Host, per call:   plan = build_plan(grid_hws, B, S); upload_plan(plan, device_plan)
Device, in graph: expand_plan(device_plan, token_meta)
                  interp_pos_embed(x, pos_table, token_meta, bias)
                  apply_rope_2d(qkv, token_meta, cos_sin, num_heads, head_dim)   (each layer)
                  merge_patches(x, token_meta, ln_weight, ln_bias)
Each kernel has a plain-PyTorch `*_reference` twin with the same arguments.

On CPU tensors the kernels run under the Triton interpreter, which must be switched on
(TRITON_INTERPRET=1) before this package is imported.
"""

from .patch_merge import merge_patches, merge_patches_reference
from .plan import (
    MAX_GRID_SIDE,
    META_COL,
    META_HEIGHT,
    META_IMAGE,
    META_MERGE_SRC,
    META_MERGE_WIDTH,
    META_ROW,
    META_ROWS,
    META_WIDTH,
    build_plan,
    expand_plan,
    expand_plan_reference,
    new_device_plan,
    new_token_meta,
    plan_cu_seqlens,
    plan_images,
    plan_max_images,
    plan_numel,
    upload_plan,
)
from .pos_embed import interp_pos_embed, interp_pos_embed_reference
from .rope2d import apply_rope_2d, apply_rope_2d_reference, rope_cos_sin_table

__all__ = [
    "MAX_GRID_SIDE",
    "META_COL",
    "META_HEIGHT",
    "META_IMAGE",
    "META_MERGE_SRC",
    "META_MERGE_WIDTH",
    "META_ROW",
    "META_ROWS",
    "META_WIDTH",
    "apply_rope_2d",
    "apply_rope_2d_reference",
    "build_plan",
    "expand_plan",
    "expand_plan_reference",
    "interp_pos_embed",
    "interp_pos_embed_reference",
    "merge_patches",
    "merge_patches_reference",
    "new_device_plan",
    "new_token_meta",
    "plan_cu_seqlens",
    "plan_images",
    "plan_max_images",
    "plan_numel",
    "rope_cos_sin_table",
    "upload_plan",
]
