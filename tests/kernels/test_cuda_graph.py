"""The kernels inside one captured CUDA graph: a new plan uploaded between replays changes the results,
which is only possible if no launcher read the plan on the host (no sync, no data-dependent shape)."""

import pytest
import torch
from kernel_cases import TOL, generator, needs_gpu, randn, relerr

from fused_moonvit.kernels import (apply_rope_2d, apply_rope_2d_reference, build_plan, expand_plan,
                                   expand_plan_reference, interp_pos_embed, interp_pos_embed_reference,
                                   merge_patches, merge_patches_reference, new_device_plan, new_token_meta,
                                   rope_cos_sin_table, upload_plan)

B, S, C, HEADS, HEAD_DIM = 2048, 6, 64, 2, 8


@pytest.mark.gpu
@needs_gpu
def test_replay_with_new_plans(device):
    gen = generator("graph")
    dt = torch.bfloat16
    x, table = randn((B, C), gen, dt, device), randn((64, 64, C), gen, dt, device)
    qkv = randn((B, 3 * HEADS * HEAD_DIM), gen, dt, device)
    weight, bias = randn((C,), gen, dt, device), randn((C,), gen, dt, device)
    freqs = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 4)[: HEAD_DIM // 4].float() / HEAD_DIM))
    cos_sin = rope_cos_sin_table(freqs.to(device))

    device_plan, meta = new_device_plan(S, device), new_token_meta(B, device)
    embedded, rotated = torch.empty_like(x), torch.empty_like(qkv)
    merged = torch.empty(B // 4, 4 * C, dtype=dt, device=device)

    def forward():
        expand_plan(device_plan, meta)
        interp_pos_embed(x, table, meta, out=embedded)
        rotated.copy_(qkv)
        apply_rope_2d(rotated, meta, cos_sin, HEADS, HEAD_DIM)
        merge_patches(embedded, meta, weight, bias, out=merged)

    plans = [build_plan(g, B, S) for g in ([(32, 32), (16, 8)], [(2, 4), (40, 24), (6, 6), (2, 2)], [])]
    upload_plan(plans[0], device_plan)
    forward()  # compiles every kernel before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()

    for plan in plans:
        upload_plan(plan, device_plan)
        graph.replay()
        torch.cuda.synchronize()
        want_meta = expand_plan_reference(plan, B).to(device)
        assert torch.equal(meta, want_meta)
        want = interp_pos_embed_reference(x, table, want_meta)
        assert relerr(embedded, want) <= TOL[dt]
        assert relerr(rotated, apply_rope_2d_reference(qkv, want_meta, cos_sin, HEADS, HEAD_DIM)) <= TOL[dt]
        assert relerr(merged, merge_patches_reference(want, want_meta, weight, bias)) <= TOL[dt]
