"""Graph replay of real-size MoonViT3d (Kimi-K2.5 / K2.6, and Kimi-K3's options) against the fp32 reference,
on images, 4-frame video chunks and batches mixing them (CUDA only; run on the H200).

Tolerance, as for Kimi-VL: ||graph_bf16 - ref_fp32|| / ||ref_fp32|| <= the same figure for the bf16 reference.
"""

import copy

import pytest
import torch

from moonvit_fixtures import random_model, random_pixels, rel_err, write_gpu_figures
from fused_moonvit.benchmarks.bench_encoder import MODELS
from fused_moonvit.moonvit import FusedMoonVit, MoonVitConfig, MoonVitGraphRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FIGURES = {}
BUDGETS = [4096, 16384]
CASES = {
    "images": [(1, 32, 32), (1, 16, 16), (1, 24, 40)],
    "identity_64x64": [(1, 64, 64)],
    "4chunks_448": [(4, 32, 32)] * 4,
    "chunks_2_3": [(2, 20, 28), (3, 16, 16)],
    "mix": [(1, 32, 32), (4, 32, 32), (1, 16, 16), (4, 24, 40), (2, 32, 32)],
}


@pytest.fixture(scope="module", params=["kimi-k25", "kimi-k3"])
def models(request):
    cfg = MoonVitConfig(**MODELS[request.param])
    ref32 = random_model(cfg, seed=0).cuda()
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    fused = FusedMoonVit(cfg)
    fused.load_state_dict(ref32.state_dict())
    fused = fused.to("cuda", torch.bfloat16).eval()
    runner = MoonVitGraphRunner(fused, budgets=BUDGETS, max_items=16)
    runner.capture(progress=False)
    yield request.param, ref32, ref16, runner
    del ref32, ref16, runner
    torch.cuda.empty_cache()


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    write_gpu_figures("FUSED_MOONVIT_GPU_FIGURES_3D", FIGURES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_within_bf16_reference_error(models, case):
    model, ref32, ref16, runner = models
    items = CASES[case]
    pix = random_pixels(items, seed=len(case)).cuda()
    g = torch.tensor(items)
    exact = ref32(pix, g)
    bf16_ref = rel_err(ref16(pix, g), exact)
    outs = runner.encode(pix, g)
    assert [o.shape[0] for o in outs] == [h * w // 4 for _, h, w in items]
    got = torch.cat(outs)
    assert torch.isfinite(got).all()
    graph = rel_err(got, exact)
    FIGURES[f"{model}/{case}"] = {"items": items, "graph_bf16_vs_fp32": graph, "reference_bf16_vs_fp32": bf16_ref,
                                  "ratio": graph / bf16_ref}
    print(f"{model} {case}: graph {graph:.3e}, bf16 reference {bf16_ref:.3e}, ratio {graph / bf16_ref:.3f}")
    assert graph <= 1.0 * bf16_ref


def test_poisoned_padding_stays_out(models):
    """NaN in the pixel buffer's padding rows, a chunk in a budget 4x its size: outputs unchanged."""
    _, _, _, runner = models
    items = [(4, 16, 16)]
    pix = random_pixels(items, seed=3).cuda()
    clean = torch.cat(runner.encode(pix, torch.tensor(items)))
    runner.pixels.fill_(float("nan"))
    poisoned = torch.cat(runner.encode(pix, torch.tensor(items)))
    assert runner.plan_chunks(items) == [(0, 1, 4096)]
    assert torch.equal(clean, poisoned)
