"""`fused-moonvit encode` on a GPU: the command's CUDA path (the fused encoder in `MoonVitGraphRunner`'s
graphs, captured as the images need them) against the fp32 eager reference (CUDA only; run on the H200).

Tolerance, as for the graph tests: ||command_bf16 - ref_fp32|| / ||ref_fp32|| <= the same figure for the
bf16 reference, over all images of the call.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from moonvit_fixtures import rel_err
from fused_moonvit.moonvit import MoonVitConfig, MoonVitReference, build_model, preprocess_image
from fused_moonvit.moonvit.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_encode_on_cuda_runs_the_graph_runner_like_the_reference(tmp_path, capsys):
    rng = np.random.default_rng(7)
    paths = []
    # Sizes that need different budgets, one above the default ladder's smallest graphs.
    for i, (w, h) in enumerate([(448, 448), (300, 120), (896, 640), (28, 28)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out = tmp_path / "emb.safetensors"
    assert main(["encode", *paths, "--device", "cuda", "--seed", "3", "--out", str(out)]) == 0
    assert "fused CUDA-graph encoder ready on cuda" in capsys.readouterr().err  # notes go to stderr

    # The command's model without --model: Kimi-VL's architecture with seeded random weights.
    ref32 = build_model(MoonVitReference, config=MoonVitConfig(), dtype=torch.float32, device="cuda", seed=3)
    ref16 = build_model(MoonVitReference, config=MoonVitConfig(), dtype=torch.bfloat16, device="cuda", seed=3)
    got, exact, bf16 = [], [], []
    with safe_open(out, framework="pt") as f:
        assert sorted(f.keys()) == [f"image_{i}" for i in range(len(paths))]
        for i, path in enumerate(paths):
            pixels, grid = preprocess_image(path)
            pixels, grid = pixels.cuda(), torch.tensor([grid])
            got.append(f.get_tensor(f"image_{i}"))
            with torch.no_grad():
                exact.append(ref32(pixels, grid).cpu())
                bf16.append(ref16(pixels.to(torch.bfloat16), grid).float().cpu())
            assert got[-1].shape == exact[-1].shape and got[-1].dtype == torch.float32
    got, exact, bf16 = torch.cat(got), torch.cat(exact), torch.cat(bf16)
    assert torch.isfinite(got).all()
    command_err, reference_err = rel_err(got, exact), rel_err(bf16, exact)
    print(f"encode on cuda: {command_err:.3e}, bf16 reference {reference_err:.3e}")
    assert command_err <= 1.0 * reference_err
