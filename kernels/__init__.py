"""Fused Triton kernels of the MoonVit forward, and the per-call plan they read.

Host, per call:   plan = build_plan(Items.of(grid), total, S); upload_plan(plan, device_plan)
Device, in graph: extend_padding_sequence(device_plan, B)    (the plan's padding sequence ends at B)
                  expand_plan(device_plan, token_meta)
                  interp_pos_embed(x, pos_table, token_meta, bias, time_table=..., mode=...)
                  apply_rope_2d(qkv, token_meta, cos_sin, num_heads, head_dim)   (each layer)
                  varlen_attention_fwd(qkv, cu_seqlens, num_heads, head_dim)     (each layer)
                  add_layer_norm(x, y, weight, ln_bias, eps, bias, rms=...)     (twice a layer)
                  merge_patches(x, token_meta, ln_weight, ln_bias, max_frames=...)
Each kernel has a plain-PyTorch `*_reference` twin with the same arguments.

On CPU tensors the kernels run under the Triton interpreter, which must be switched on
(TRITON_INTERPRET=1) before the first kernel module is imported. The kernel modules are imported on
first use of a name from this package, so importing the package (or `fused_moonvit.kernels.limits`, or
`fused_moonvit.kernels.launch`, the launch tables' lookup) alone does not decide it.
"""

import importlib

_EXPORTS = {
    "attention": ["AttentionConfig", "varlen_attention_fwd", "varlen_attention_reference"],
    "items": ["Items", "grid_thw_list"],
    "layernorm": ["LayerNormConfig", "add_layer_norm", "add_layer_norm_reference"],
    "limits": ["MAX_GRID_SIDE", "check_budget"],
    "patch_merge": ["merge_patches", "merge_patches_reference"],
    "plan": ["META_COL", "META_HEIGHT", "META_ITEM", "META_MERGE_FRAMES", "META_MERGE_SRC",
             "META_MERGE_STRIDE", "META_MERGE_WIDTH", "META_ROW", "META_ROWS", "META_TIME", "META_WIDTH",
             "build_plan", "expand_plan", "expand_plan_reference", "extend_padding_sequence", "new_device_plan",
             "new_token_meta", "plan_cu_outputs", "plan_cu_seqlens", "plan_items", "plan_max_items", "plan_numel",
             "upload_plan"],
    "pos_embed": ["interp_pos_embed", "interp_pos_embed_reference"],
    "rope2d": ["apply_rope_2d", "apply_rope_2d_reference", "rope_cos_sin_table"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
